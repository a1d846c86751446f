"""Choosing the default page size: decode speed vs cache-hit granularity, same run.

    python bench/page_size.py

Small pages waste less of a shared prefix (a hit is rounded down to whole pages) but make
the page tables and slot gathers longer; large pages are the reverse. For each page size this
measures decode tokens/s at batch 32 and the share of a second chat turn's prompt served
from the cache.
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from common import save, table
from radixrt import Engine


def decode_tok_s(engine: Engine, prompts: list[list[int]], new: int) -> float:
    def run(n: int) -> float:
        engine.flush_cache()
        start = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": n, "min_new_tokens": n, "temperature": 0})
        return time.perf_counter() - start

    short, long = run(4), run(4 + new)
    return len(prompts) * new / (long - short)


def second_turn_hit(engine: Engine) -> float:
    engine.flush_cache()
    hits = total = 0
    for i in range(8):
        messages = [{"role": "user", "content": f"Tell me a fact about the number {i * 7}."}]
        first = engine.chat(messages, {"max_new_tokens": 24, "temperature": 0})
        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Another one?"}]
        second = engine.chat(messages, {"max_new_tokens": 4, "temperature": 0})
        hits, total = hits + second.usage.cached_tokens, total + second.usage.prompt_tokens
    return hits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--page-sizes", default="1,4,16,64")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention-backend", default="auto")
    args = parser.parse_args()
    rows = []
    for ps in tqdm([int(p) for p in args.page_sizes.split(",")], desc="page sizes"):
        with Engine(page_size=ps, dtype=args.dtype, attention_backend=args.attention_backend) as engine:
            prompts = [engine.tokenizer.encode(f"Story {i}: once upon a time " * 20) for i in range(32)]
            rows.append({"page size": ps, "decode tok/s (b32)": decode_tok_s(engine, prompts, 32),
                         "turn-2 hit rate": second_turn_hit(engine), "backend": engine.worker.backend.name})  # fmt: skip
    print(table(rows, ["page size", "backend", "decode tok/s (b32)", "turn-2 hit rate"]))
    print("results:", save("page_size", {"dtype": args.dtype, "rows": rows}))


if __name__ == "__main__":
    main()
