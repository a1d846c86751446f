"""Choosing the default page size: decode speed vs cache-hit granularity, same run.

    python bench/page_size.py

Small pages waste less of a shared prefix (a hit is rounded down to whole pages) but make
the page tables and slot gathers longer; large pages are the reverse. For each page size this
measures decode tokens/s at batch 32 (round-robin over the sizes, best of --rounds) and the
share of a second chat turn's prompt served from the cache.
"""

from __future__ import annotations

import argparse
import time

from common import save, table
from tqdm import tqdm

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
    parser.add_argument(
        "--rounds", type=int, default=3, help="round-robin decode measurements per page size; best kept"
    )
    args = parser.parse_args()
    sizes = [int(p) for p in args.page_sizes.split(",")]
    engines = {
        ps: Engine(page_size=ps, dtype=args.dtype, attention_backend=args.attention_backend, kv_memory_gb=0.5)
        for ps in tqdm(sizes, desc="loading engines")
    }
    try:
        prompts = [engines[sizes[0]].tokenizer.encode(f"Story {i}: once upon a time " * 20) for i in range(32)]
        # Round-robin, best of each: on a shared machine one pass per size measures the neighbours' load.
        speeds: dict[int, list[float]] = {ps: [] for ps in sizes}
        for _ in tqdm(range(args.rounds), desc="rounds"):
            for ps in sizes:
                speeds[ps].append(decode_tok_s(engines[ps], prompts, 32))
        rows = [
            {
                "page size": ps,
                "decode tok/s (b32)": max(speeds[ps]),
                "all rounds": [round(x, 1) for x in speeds[ps]],
                "turn-2 hit rate": second_turn_hit(engines[ps]),
                "backend": engines[ps].worker.runner.backend.name,
            }
            for ps in sizes
        ]
    finally:
        for engine in engines.values():
            engine.shutdown()
    print(table(rows, ["page size", "backend", "decode tok/s (b32)", "all rounds", "turn-2 hit rate"]))
    print("results:", save("page_size", {"dtype": args.dtype, "rounds": args.rounds, "rows": rows}))


if __name__ == "__main__":
    main()
