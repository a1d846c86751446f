"""Few-shot question answering: a fixed block of solved examples, then the question.

Every program starts with the same examples, so `run_batch` caches them once and each
question only computes its own few tokens.

    python examples/few_shot_qa.py
"""

from __future__ import annotations

from _util import backend_for, parse_args

import radixrt as sgl

SHOTS = [
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("How many legs does a spider have?", "Eight"),
    ("What is the chemical symbol for gold?", "Au"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("What is the boiling point of water in Celsius?", "100 degrees"),
    ("What language is spoken in Brazil?", "Portuguese"),
]

QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Italy?",
    "What is the chemical symbol for water?",
    "How many days are in a week?",
    "What color is the sky on a clear day?",
    "What is the capital of Germany?",
]


@sgl.function
def few_shot_qa(s, question, max_tokens=16):
    s += "Answer each question in a few words.\n\n"
    for q, a in SHOTS:
        s += f"Q: {q}\nA: {a}\n\n"
    s += f"Q: {question}\nA:" + sgl.gen("answer", max_tokens=max_tokens, stop="\n", temperature=0)


def main(argv=None, backend=None) -> list[str]:
    args = parse_args("Few-shot QA over a batch of questions.", argv, max_tokens=16)
    with backend_for(args, backend) as backend:
        batch = [{"question": q, "max_tokens": args.max_tokens} for q in QUESTIONS]
        states = few_shot_qa.run_batch(batch, backend=backend)
    answers = [st["answer"].strip() for st in states]
    for q, a in zip(QUESTIONS, answers):
        print(f"{q} -> {a}")
    return answers


if __name__ == "__main__":
    main()
