"""Structured extraction: the reply is constrained to a JSON schema, so it always parses.

    python examples/json_extraction.py
"""

from __future__ import annotations

import json

from _util import backend_for, parse_args

import radixrt as sgl

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}

TEXTS = [
    "Maria Lopez is a 34-year-old architect who lives in Madrid.",
    "At 71, retired teacher John Smith still walks his dog around Boston every morning.",
    "Aiko Tanaka, 25, moved to Osaka last spring to start her first job.",
]


@sgl.function
def extract_person(s, text, max_tokens=64):
    s += sgl.system("Extract the person's name, age and city from the text as JSON.")
    s += sgl.user(text)
    s += sgl.assistant(sgl.gen("json", max_tokens=max_tokens, json_schema=PERSON, temperature=0))


def main(argv=None, backend=None) -> list[dict | None]:
    args = parse_args("Extract JSON records that follow a schema.", argv, max_tokens=64)
    with backend_for(args, backend) as backend:
        batch = [{"text": t, "max_tokens": args.max_tokens} for t in TEXTS]
        states = extract_person.run_batch(batch, backend=backend)
    records = []
    for text, state in zip(TEXTS, states):
        try:
            records.append(json.loads(state["json"]))
        except json.JSONDecodeError:  # only when max_tokens cut the object short
            records.append(None)
        print(f"{text}\n    -> {state['json']}")
    return records


if __name__ == "__main__":
    main()
