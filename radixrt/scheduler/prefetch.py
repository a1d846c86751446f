"""Prefetch: a waiting request's pages come back from the disk tier before it is admitted.

For the first few requests in the admission order, and for any candidate the scheduler is
about to admit, the pages on disk right after the request's memory match are read into free
memory pages in the background (cache/tiered.py: `start_load`). A request whose read is in
flight is passed over this step; once the pages are in the tree, its admission matches them
like any cached prefix. The step loop never waits for the disk, and a request whose pages
cannot be loaded (no memory free) is simply admitted and computes them.

A load may take at most what memory can spare: free and evictable pages, less one page of
headroom per running request (so decode does not preempt), less what other loads hold.
"""

from __future__ import annotations

from collections.abc import Callable

from radixrt.cache.page_pool import PageAllocator
from radixrt.cache.tiered import LoadJob, TieredCache
from radixrt.request import Req

PREFETCH_AHEAD = 4  # requests at the head of the order whose disk pages are read ahead


class Prefetcher:
    def __init__(self, cache: TieredCache, allocator: PageAllocator) -> None:
        self.cache = cache
        self.allocator = allocator
        self.jobs: dict[Req, LoadJob] = {}

    def loading(self, req: Req, cacheable_len: int, headroom: int) -> bool:
        """Must req wait for pages on their way from disk? Starts the read if there is one to start."""
        job = self.jobs.get(req)
        if job is not None and not job.finished:
            return True
        return self._start(req, cacheable_len, headroom)

    def ahead(self, reqs: list[Req], cacheable_len: Callable[[Req], int], headroom: int) -> None:
        """Start reads for the head of the order, so they land while those requests still wait."""
        for req in reqs[:PREFETCH_AHEAD]:
            if req not in self.jobs:
                self._start(req, cacheable_len(req), headroom)

    def release(self, req: Req) -> None:
        """req was admitted (it holds its own lock now) or left: the load's lock goes."""
        job = self.jobs.pop(req, None)
        if job is not None:
            self.cache.release_load(job)

    def _start(self, req: Req, cacheable_len: int, headroom: int) -> bool:
        ps = self.cache.page_size
        hashes = req.page_hashes(ps)[: cacheable_len // ps]
        in_memory = self.cache.memory_pages(hashes)
        if not self.cache.disk_run(hashes, in_memory):
            return False
        spare = self.allocator.num_free + self.cache.evictable_pages - headroom
        if spare <= 0:
            return False
        job = self.cache.start_load(req.token_ids[: len(hashes) * ps], req.params.cache_salt, hashes, spare)
        if job is None:
            return False
        self.release(req)  # an earlier, finished load: the new one's lock covers it
        self.jobs[req] = job
        return True
