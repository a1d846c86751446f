"""Cache-aware scheduling: policy order, the starvation guard, in-batch prefix sharing."""

from __future__ import annotations

import time

import pytest

from radixrt import Engine
from radixrt.cache.page_pool import PageAllocator
from radixrt.cache.radix_tree import RadixCache
from radixrt.request import Req
from radixrt.sampling_params import SamplingParams
from radixrt.scheduler.policy import make_policy

PS = 4


def cached_tree(*sequences: list[int]) -> RadixCache:
    cache = RadixCache(PS, PageAllocator(256))
    for seq in sequences:
        pages = cache.allocator.alloc(len(seq) // PS)
        cache.insert(seq, pages)
    return cache


def req(rid: str, ids: list[int], age_s: float = 0.0) -> Req:
    return Req(rid, ids, SamplingParams(), arrival_time=time.monotonic() - age_s)


def order(policy: str, cache: RadixCache, waiting: list[Req], timeout: float = 60) -> list[str]:
    """The whole admission order of `waiting` (queued in list order) under `policy`."""
    p = make_policy(policy, cache, starvation_timeout_s=timeout)
    queue = p.new_queue()
    for r in waiting:
        queue.append(r)
    return [r.rid for r in p.order(queue, time.monotonic(), limit=len(waiting))]


def test_lpm_puts_longest_cached_prefix_first():
    shared = list(range(40))
    cache = cached_tree(shared)
    waiting = [req("none", [99] * 40), req("half", shared[:20] + [98] * 20), req("all", shared + [1])]
    assert order("lpm", cache, waiting) == ["all", "half", "none"]


def test_starvation_guard_beats_policy_order():
    shared = list(range(40))
    cache = cached_tree(shared)
    waiting = [req("cached", shared + [1]), req("old-miss", [99] * 40, age_s=120)]
    assert order("lpm", cache, waiting) == ["old-miss", "cached"]


def test_fcfs_keeps_arrival_order():
    cache = cached_tree(list(range(40)))
    waiting = [req("a", [99] * 8), req("b", list(range(40)))]
    assert order("fcfs", cache, waiting) == ["a", "b"]


def test_dfs_weight_runs_the_heaviest_subtree_first_and_keeps_groups_together():
    a, b = [1] * 16, [2] * 16
    cache = cached_tree(a + [5] * 8, a + [6] * 8, b)
    waiting = [
        req("b1", b + [7] * 8),
        req("a5", a + [5] * 8 + [9] * 4),
        req("b2", b + [8] * 8),
        req("a6", a + [6] * 8 + [9] * 4),
        req("b3", b + [9] * 8),
    ]
    ranked = order("dfs-weight", cache, waiting)
    assert ranked[:3] == ["b1", "b2", "b3"]  # 3 waiting under b beat 2 under a
    assert set(ranked[3:]) == {"a5", "a6"}


def test_dfs_weight_runs_deeper_hits_before_requests_that_stop_at_their_ancestor():
    """A chat whose history is cached goes before one that only shares the system prompt: the
    miss, run first, would evict the history the hit is about to use."""
    system = [1] * 16
    cache = cached_tree(system + [5] * 8)
    waiting = [req("miss", system + [6] * 8), req("hit", system + [5] * 8 + [9] * 4)]
    assert order("dfs-weight", cache, waiting) == ["hit", "miss"]


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight", "fcfs"])
def test_in_batch_sharing_computes_a_shared_uncached_prefix_once(tiny_llama, policy):
    shared = list(range(3, 67))  # 64 tokens nobody has computed yet
    prompts = [shared + [100 + i, 101 + i] for i in range(6)]
    params = {"max_new_tokens": 2, "temperature": 0}
    with Engine(str(tiny_llama), page_size=PS, schedule_policy=policy, chunked_prefill_size=1024) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        solo = [engine.generate(input_ids=p, sampling_params=params).token_ids for p in prompts]
    hits = sorted(o.usage.cached_tokens for o in outs)
    assert hits[0] == 0 and all(h >= 64 for h in hits[1:])  # one computed it, five hit it
    assert [o.token_ids for o in outs] == solo


def test_cache_salt_isolates_tenants(tiny_llama):
    prompt = list(range(3, 60))
    params = {"max_new_tokens": 2, "temperature": 0}
    with Engine(str(tiny_llama), page_size=PS) as engine:
        engine.generate(input_ids=prompt, sampling_params=dict(params, cache_salt="tenant-a"))
        other = engine.generate(input_ids=prompt, sampling_params=dict(params, cache_salt="tenant-b"))
        same = engine.generate(input_ids=prompt, sampling_params=dict(params, cache_salt="tenant-a"))
        public = engine.generate(input_ids=prompt, sampling_params=params)
    assert other.usage.cached_tokens == 0 and public.usage.cached_tokens == 0
    assert same.usage.cached_tokens > 0


def test_flush_cache(tiny_llama):
    prompt = list(range(3, 60))
    params = {"max_new_tokens": 2, "temperature": 0}
    with Engine(str(tiny_llama), page_size=PS) as engine:
        engine.generate(input_ids=prompt, sampling_params=params)
        assert engine.stats().cached_pages > 0
        assert engine.flush_cache()
        stats = engine.stats()
        assert stats.cached_pages == 0 and stats.free_pages == stats.total_pages
        assert engine.generate(input_ids=prompt, sampling_params=params).usage.cached_tokens == 0
