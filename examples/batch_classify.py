"""`run_batch` over 100 inputs with a progress bar: sentiment of short reviews by `select`.

`select` scores "positive" and "negative" as continuations of each review in one batched
request; the few-shot block shared by all 100 programs is cached once up front.

    python examples/batch_classify.py
"""

from __future__ import annotations

import itertools

from _util import backend_for, parse_args

import radixrt as sgl

ITEMS = ["pizza", "movie", "hotel room", "phone", "concert"]
GOOD = ["was wonderful", "was great, I loved it", "exceeded my expectations", "made my day", "was excellent"]
BAD = ["was terrible", "was awful, I hated it", "was a huge disappointment", "ruined my day", "was horrible"]


def reviews(n: int = 100) -> list[tuple[str, str]]:
    """n labelled reviews, half positive, half negative."""
    good = [(f"The {i} {g}.", "positive") for i, g in itertools.product(ITEMS, GOOD)]
    bad = [(f"The {i} {b}.", "negative") for i, b in itertools.product(ITEMS, BAD)]
    alternating = itertools.chain.from_iterable(zip(itertools.cycle(good), itertools.cycle(bad)))
    return list(itertools.islice(alternating, n))


SHOTS = [
    ("The food was delicious.", "positive"),
    ("The service was rude and slow.", "negative"),
    ("I love this phone.", "positive"),
    ("The room was dirty.", "negative"),
]


@sgl.function
def classify(s, review):
    s += "Classify the sentiment of each review.\n\n"
    for text, label in SHOTS:
        s += f"Review: {text}\nSentiment: {label}\n\n"
    s += f"Review: {review}\nSentiment: " + sgl.select("label", ["positive", "negative"])


def main(argv=None, backend=None) -> float:
    args = parse_args("Classify 100 reviews with run_batch.", argv, max_tokens=0, n=(int, 100, "number of reviews"))
    data = reviews(args.n)
    with backend_for(args, backend) as backend:
        states = classify.run_batch([{"review": r} for r, _ in data], backend=backend, progress_bar=True)
    correct = sum(st["label"] == label for st, (_, label) in zip(states, data))
    print(f"accuracy: {correct}/{len(data)}")
    return correct / len(data)


if __name__ == "__main__":
    main()
