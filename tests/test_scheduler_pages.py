"""The scheduler without a model: the real radix cache and page allocator, a stand-in for the forward.

Invariant, checked after every step: each page is in exactly one place, free, owned by one
running request (past its cached prefix), or held by the prefix cache; and when every
request has finished or been aborted, no lock is left and free + cached = all pages.
Requests are drawn to share prefixes, the pool is small enough to force eviction and
preemption, and some are aborted mid-run.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from radixrt.cache.page_pool import PageAllocator
from radixrt.cache.radix_tree import RadixCache
from radixrt.request import Req
from radixrt.sampling_params import SamplingParams
from radixrt.scheduler.scheduler import Scheduler

PS = 4


def cached_page_ids(cache: RadixCache) -> list[int]:
    return [p for node in cache._nodes() for p in node.pages]


def check_pages(scheduler: Scheduler, allocator: PageAllocator, cache: RadixCache) -> None:
    free = [p for p in range(allocator.num_pages) if allocator._is_free[p]]
    cached = cached_page_ids(cache)
    owned = [p for r in scheduler.running for p in r.page_table[r.num_tree_pages :]]
    tree_refs = {p for r in scheduler.running for p in r.page_table[: r.num_tree_pages]}
    everything = free + cached + owned
    assert sorted(everything) == list(range(allocator.num_pages)), "a page is lost or in two places"
    assert tree_refs <= set(cached), "a request reads a prefix page the cache no longer holds"
    assert all(not r.page_table for r in scheduler.waiting), "a waiting request holds pages"


def forward(scheduler: Scheduler, batch) -> list[Req]:
    """What the model would do: compute the scheduled tokens; a request at its last prompt token
    gains one output token. Returns the requests that reached their length."""
    done = []
    for req, n in zip(batch.reqs, batch.num_new):
        req.num_computed += n
        if req.num_computed == req.num_tokens:
            req.append_token(7)
            if len(req.output_ids) >= req.params.max_new_tokens:
                done.append(req)
                continue
        if n > 1:  # a prefill chunk: published to the cache at once, as the worker does
            scheduler.cache_progress(req)
    return done


prompts = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 20), st.integers(1, 20)),  # (shared prefix, own tokens, outputs)
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(
    requests=prompts,
    num_pages=st.integers(14, 28),  # the longest request needs 13 pages: eviction and preemption happen
    policy=st.sampled_from(["lpm", "dfs-weight", "fcfs"]),
    abort_every=st.integers(0, 5),
)
def test_every_page_is_accounted_for(requests, num_pages, policy, abort_every):
    allocator = PageAllocator(num_pages)
    cache = RadixCache(PS, allocator)
    scheduler = Scheduler(
        allocator, cache, policy=policy, chunked_prefill_size=16, max_running_requests=4, starvation_timeout_s=60
    )
    shared = {k: [100 + k] * 4 * (k + 1) for k in range(3)}
    reqs = []
    for i, (prefix, own, outputs) in enumerate(requests):
        ids = shared[prefix] + [200 + i] * own
        reqs.append(Req(f"r{i}", ids, SamplingParams(max_new_tokens=outputs)))
        scheduler.add(reqs[-1])
    for step in range(400):
        batch = scheduler.schedule()
        if batch is None:
            break
        for req in forward(scheduler, batch):
            scheduler.remove(req)
        if abort_every and step % abort_every == abort_every - 1 and scheduler.running:
            scheduler.remove(scheduler.running[0])  # a client that left
        check_pages(scheduler, allocator, cache)
    assert not scheduler.has_work(), "the scheduler stopped making progress"
    assert cache.protected_pages == 0, "a lock outlived its request"
    assert allocator.num_free + len(cached_page_ids(cache)) == num_pages
