"""What ordering the waiting queue costs per scheduler step, at 128 to 10,000 waiting requests.

    python bench/policy_cost.py            # 128, 1,000, 5,000, 10,000 waiting
    python bench/policy_cost.py --quick    # 128 and 1,000

SGLang falls back to FCFS above 128 waiting requests because longest-prefix-match walks the tree
for every request every step. radixrt's lpm keeps each waiting request's cached length current as
the cache changes (scheduler/waiting.py), so a step only pops its candidates off a heap. Measured
on a tree of 1,000 cached ~1,000-token sequences (page size 16):

- `lpm ms`: a step's ordering, the first 256 candidates (what the scheduler looks at);
- `upkeep ms`: what a step's cache changes cost the queue's bookkeeping: one finished request
  inserted (its prompt plus 64 new tokens) and as many pages evicted, with the lpm queue
  listening, minus the same changes with nobody listening (`cache ms`);
- `full re-rank ms`: the previous lpm, every request's cached length looked up and sorted;
- `tree-walk lpm ms`: SGLang's, every request matched through the tree;
- fcfs and dfs-weight (which still walks every request through the tree) for comparison.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from common import save, table

from radixrt.cache.page_pool import PageAllocator
from radixrt.cache.radix_tree import RadixCache
from radixrt.request import Req
from radixrt.sampling_params import SamplingParams
from radixrt.scheduler.policy import make_policy
from radixrt.scheduler.scheduler import ADMIT_CANDIDATES

PS = 16


def build(num_cached: int, length: int, rng: random.Random) -> tuple[RadixCache, list[list[int]]]:
    """A tree of sequences that share system prompts and conversation prefixes, like a chat server's."""
    cache = RadixCache(PS, PageAllocator(num_cached * length // PS + 4096))
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


def full_rerank(cache: RadixCache, waiting: list[Req]) -> list[Req]:
    """The previous lpm: every request's cached length looked up by its page hashes, then sorted."""
    lengths = {id(r): cache.cached_pages(r.page_hashes(PS)) for r in waiting}
    return sorted(waiting, key=lambda r: -lengths[id(r)])


def tree_walk_lpm(cache: RadixCache, waiting: list[Req]) -> list[Req]:
    """What matching every request through the tree costs (SGLang's lpm)."""
    lengths = {id(r): cache.match_prefix(r.token_ids, record=False).num_tokens for r in waiting}
    return sorted(waiting, key=lambda r: -lengths[id(r)])


def step_changes(cache: RadixCache, waiting: list[Req], rng: random.Random, repeats: int) -> float:
    """Median ms of one step's cache changes: a waiting request finishes (its tokens plus 64 new
    ones are inserted), and as many pages are evicted."""
    samples = []
    for _ in range(repeats):
        done = rng.choice(waiting).token_ids
        ids = done + [rng.randrange(50_000) for _ in range(64)]
        ids = ids[: len(ids) // PS * PS]
        start = time.perf_counter()
        pages = cache.allocator.alloc(len(ids) // PS)
        already = cache.insert(ids, pages)
        cache.allocator.free(pages[: already // PS])
        cache.evict(len(ids) // PS - already // PS)
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def time_ms(fn, repeats: int = 5) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 and 1,000 waiting only")
    args = ap.parse_args()
    rows = []
    for n in (128, 1000) if args.quick else (128, 1000, 5000, 10_000):
        rng = random.Random(n)
        cache, seqs = build(1000, 1024, rng)  # afresh: the lpm queue below listens to this cache for good
        waiting = waiting_requests(n, seqs, rng)
        start = time.perf_counter()
        for r in waiting:
            r.page_hashes(PS)  # computed once per request on arrival, then kept
        hash_ms = 1000 * (time.perf_counter() - start)
        now = time.monotonic()
        row = {"waiting": n, "hash once ms": hash_ms}
        row["cache ms"] = step_changes(cache, waiting, rng, 21)
        for name in ("lpm", "fcfs", "dfs-weight"):
            policy = make_policy(name, cache, starvation_timeout_s=1e9)
            queue = policy.new_queue()
            start = time.perf_counter()
            for r in waiting:
                queue.append(r)
            row[f"{name} enqueue ms"] = 1000 * (time.perf_counter() - start)
            repeats = 1 if name == "dfs-weight" else 21
            row[f"{name} ms"] = time_ms(lambda: policy.order(queue, now, ADMIT_CANDIDATES), repeats)
            if name == "lpm":
                row["upkeep ms"] = max(step_changes(cache, waiting, rng, 21) - row["cache ms"], 0.0)
                assert policy.order(queue, now, n) == full_rerank(cache, waiting)  # same order as a re-rank
        row["full re-rank ms"] = time_ms(lambda: full_rerank(cache, waiting))
        row["tree-walk lpm ms"] = time_ms(lambda: tree_walk_lpm(cache, waiting), 1)
        rows.append(row)
        print(f"{n} waiting: lpm {row['lpm ms']:.3f} ms + upkeep {row['upkeep ms']:.3f} ms per step", flush=True)
    cols = ["waiting", "lpm ms", "upkeep ms", "full re-rank ms", "tree-walk lpm ms", "fcfs ms", "dfs-weight ms",
            "lpm enqueue ms", "hash once ms", "cache ms"]  # fmt: skip
    print(f"\nOrdering cost per scheduler step (median), first {ADMIT_CANDIDATES} candidates; 1,000 cached sequences "
          f"of 1,024 tokens, page {PS}\n")  # fmt: skip
    print(table(rows, cols))
    print("\n'lpm enqueue' and 'hash once' are paid once per request, on arrival, for all of them together.")
    print("results:", save("policy_cost", {"rows": rows, "candidates": ADMIT_CANDIDATES}))


if __name__ == "__main__":
    main()
