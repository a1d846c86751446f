"""The waiting queue's incremental order (scheduler/waiting.py) equals a full re-rank.

The reference is what the policies computed before ranks were kept incrementally: starving
requests first in queue order, then lpm's stable sort of the rest by cached pages, asked of the
cache afresh (fcfs: queue order). Random queues (arrivals, preempted requests re-queued at the
head, removals, time passing) interleave with random cache changes (inserts, evictions, flushes),
and after every operation the whole order must match. A disk tier's pages count too.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixrt.cache.disk_tier import DiskTier
from radixrt.cache.page_pool import KVPool, PageAllocator
from radixrt.cache.radix_tree import RadixCache
from radixrt.cache.tiered import TieredCache
from radixrt.request import Req
from radixrt.sampling_params import SamplingParams
from radixrt.scheduler.policy import make_policy

PS = 2
TIMEOUT = 50.0
CONVS = [[c] * 4 + [(c * 7 + i) % 5 for i in range(20)] for c in range(3)]  # shared starts, long enough to branch


def sequence(x: int) -> list[int]:
    """A cut of one of a few conversations plus a short tail of its own: prefixes collide often."""
    conv, cut, tail = x % 3, (x // 3) % 24, (x // 72) % 4
    return CONVS[conv][:cut] + [9] * tail + [x % 2]


def reference(queue: list[Req], cache, now: float, policy: str) -> list[str]:
    starving = [r for r in queue if now - r.arrival_time > TIMEOUT]
    rest = [r for r in queue if now - r.arrival_time <= TIMEOUT]
    if policy == "lpm":
        rest = sorted(rest, key=lambda r: -cache.cached_pages(r.page_hashes(PS)))
    return [r.rid for r in starving + rest]


OPS = st.lists(
    st.tuples(
        st.sampled_from(["arrive", "arrive", "requeue", "leave", "insert", "insert", "evict", "tick", "flush"]),
        st.integers(0, 10**6),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops=OPS, policy=st.sampled_from(["lpm", "lpm", "fcfs"]))
def test_incremental_order_equals_a_full_re_rank(ops, policy):
    cache = RadixCache(PS, PageAllocator(16))  # small: inserts evict
    p = make_policy(policy, cache, starvation_timeout_s=TIMEOUT)
    queue, mirror, gone = p.new_queue(), [], []
    now = 1000.0
    for n, (op, x) in enumerate(ops):
        if op == "arrive":
            req = Req(f"r{n}", sequence(x), SamplingParams(), arrival_time=now - x % 80)
            queue.append(req)
            mirror.append(req)
        elif op == "requeue" and gone:  # a preempted request: back at the head, with more tokens
            req = gone.pop(x % len(gone))
            req.append_token(x % 5)
            queue.appendleft(req)
            mirror.insert(0, req)
        elif op == "leave" and mirror:
            req = mirror.pop(x % len(mirror))
            queue.remove(req)
            gone.append(req)
        elif op == "insert":
            ids = sequence(x)[: len(sequence(x)) // PS * PS]
            if cache.allocator.num_free < len(ids) // PS:
                cache.evict(len(ids) // PS - cache.allocator.num_free)
            pages = cache.allocator.alloc(len(ids) // PS)
            if pages is not None:
                already = cache.insert(ids, pages)
                cache.allocator.free(pages[: already // PS])
        elif op == "evict":
            cache.evict(x % 10)
        elif op == "tick":
            now += x % 30
        elif op == "flush":
            cache.flush()
        got = [r.rid for r in p.order(queue, now, limit=len(mirror))]
        assert got == reference(mirror, cache, now, policy)
        assert p.order(queue, now, limit=3) == [r for r in p.order(queue, now, limit=len(mirror))][:3]


def test_pages_on_disk_count_in_the_ranking(tmp_path):
    """A request whose history is on disk only outranks one with a shorter prefix in memory."""
    layout = SimpleNamespace(num_layers=1, num_kv_heads=1, head_dim=1, kv_bytes_per_token=lambda b: 2 * b)
    pool, alloc = KVPool(layout, 16, PS, torch.float32), PageAllocator(16)
    cache = TieredCache(PS, alloc, pool, DiskTier(tmp_path, 1 << 16, {"t": 1}, pool.page_shape, torch.float32))
    policy = make_policy("lpm", cache, starvation_timeout_s=TIMEOUT)
    queue = policy.new_queue()
    history, short = list(range(20)), [50, 51, 52, 53]
    queue.append(Req("short", short + [1], SamplingParams()))
    queue.append(Req("history", history + [1], SamplingParams()))
    assert [r.rid for r in policy.order(queue, time.monotonic(), 2)] == ["short", "history"]  # nothing cached
    cache.insert(history, alloc.alloc(10))
    deadline = time.monotonic() + 10
    while cache.io_pending and time.monotonic() < deadline:
        cache.poll()
    cache.evict(10)  # memory drops it; the disk has it
    cache.insert(short, alloc.alloc(2))
    assert cache.memory_pages(next(iter(queue)).page_hashes(PS)) == 2
    assert [r.rid for r in policy.order(queue, time.monotonic(), 2)] == ["history", "short"]
    assert [queue.cached_pages(r) for r in queue] == [2, 10]
    cache.close()
