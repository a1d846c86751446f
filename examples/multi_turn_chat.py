"""Multi-turn chat with role blocks: each turn's prompt is the last turn's prompt plus two
messages, so the conversation so far comes from the prefix cache (see `cached_tokens`).

    python examples/multi_turn_chat.py
"""

from __future__ import annotations

from _util import backend_for, parse_args

import radixrt as sgl

QUESTIONS = [
    "What is the capital of France?",
    "What is a famous landmark there?",
    "How tall is it, roughly?",
]


@sgl.function
def multi_turn(s, questions, max_tokens=48):
    s += sgl.system("You are a helpful assistant. Answer in one or two sentences.")
    for i, question in enumerate(questions):
        with s.user():
            s += question
        with s.assistant():
            s += sgl.gen(f"answer_{i}", max_tokens=max_tokens, temperature=0)


def main(argv=None, backend=None) -> sgl.ProgramState:
    args = parse_args("A three-turn conversation.", argv, max_tokens=48)
    with backend_for(args, backend) as backend:
        state = multi_turn.run(QUESTIONS, args.max_tokens, backend=backend)
    for i, question in enumerate(QUESTIONS):
        meta = state.get_meta_info(f"answer_{i}")
        print(f"user: {question}")
        print(f"assistant: {state[f'answer_{i}']}")
        print(f"    ({meta['cached_tokens']} of {meta['prompt_tokens']} prompt tokens from the cache)")
    return state


if __name__ == "__main__":
    main()
