"""What ordering the waiting queue costs per step, at hundreds to thousands of waiting requests.

    python bench/policy_cost.py

SGLang falls back to FCFS above 128 waiting requests because longest-prefix-match walks the
tree for every request every step. radixrt's lpm looks each request's page hashes up in a
set instead (O(log pages) per request); this measures both, plus dfs-weight and fcfs, on a
tree of 1,000 cached ~1,000-token sequences (page size 16).
"""

from __future__ import annotations

import random
import statistics
import time

from common import save, table

from radixrt.cache.page_pool import PageAllocator
from radixrt.cache.radix_tree import RadixCache
from radixrt.request import Req
from radixrt.sampling_params import SamplingParams
from radixrt.scheduler.policy import make_policy

PS = 16


def build(num_cached: int, length: int, rng: random.Random) -> tuple[RadixCache, list[list[int]]]:
    """A tree of sequences that share system prompts and conversation prefixes, like a chat server's."""
    cache = RadixCache(PS, PageAllocator(num_cached * length // PS + 1))
    systems = [[rng.randrange(50_000) for _ in range(256)] for _ in range(8)]
    seqs = []
    for _ in range(num_cached):
        seq = rng.choice(systems) + [rng.randrange(50_000) for _ in range(length - 256)]
        cache.insert(seq, cache.allocator.alloc(length // PS))
        seqs.append(seq)
    return cache, seqs


def waiting_requests(n: int, seqs: list[list[int]], rng: random.Random) -> list[Req]:
    """Half continue a cached conversation, half are new requests behind a cached system prompt."""
    reqs = []
    for i in range(n):
        base = rng.choice(seqs)
        cut = rng.randrange(256, len(base)) if i % 2 else 256
        reqs.append(Req(f"r{i}", base[:cut] + [rng.randrange(50_000) for _ in range(64)], SamplingParams()))
    return reqs


def tree_walk_lpm(cache: RadixCache, waiting: list[Req]) -> list[Req]:
    """What matching every request through the tree costs (SGLang's lpm)."""
    lengths = {id(r): cache.match_prefix(r.token_ids, record=False).num_tokens for r in waiting}
    return sorted(waiting, key=lambda r: -lengths[id(r)])


def time_ms(fn, repeats: int = 5) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def main() -> None:
    rng = random.Random(0)
    cache, seqs = build(1000, 1024, rng)
    rows = []
    for n in (128, 1000, 5000):
        waiting = waiting_requests(n, seqs, rng)
        for r in waiting:
            r.page_hashes(PS)  # computed once per request on arrival, then kept
        now = time.monotonic()
        row = {"waiting": n}
        for name in ("fcfs", "lpm", "dfs-weight"):
            policy = make_policy(name, cache, starvation_timeout_s=1e9)
            row[f"{name} ms"] = time_ms(lambda: policy.order(waiting, now))
        row["tree-walk lpm ms"] = time_ms(lambda: tree_walk_lpm(cache, waiting))
        row["hash once ms"] = time_ms(lambda: [Req(r.rid, r.token_ids, r.params).page_hashes(PS) for r in waiting], 1)
        rows.append(row)
    cols = ["waiting", "fcfs ms", "lpm ms", "tree-walk lpm ms", "dfs-weight ms", "hash once ms"]
    print("Ordering cost per scheduler step (median of 5), 1,000 cached sequences of 1,024 tokens, page 16\n")
    print(table(rows, cols))
    print("\n'hash once' is the one-time cost of hashing the waiting requests' pages on arrival.")
    print("results:", save("policy_cost", {"rows": rows}))


if __name__ == "__main__":
    main()
