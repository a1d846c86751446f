"""TieredCache: the radix tree in memory over a disk tier that outlives memory and restarts.

    memory: radix_tree.py                      disk: disk_tier.py
    ┌─────────────────────────┐  write-through  ┌─────────────────────────┐
    │ pages of the KV pool    │ ──────────────▶ │ slots of pages.bin      │
    │ LRU, unlocked leaves    │ ◀────────────── │ LRU, leaves not in use  │
    └─────────────────────────┘    load back    └─────────────────────────┘
                                (while the request waits in the queue)

Write-through: every page that enters the tree and is not on disk yet is copied out of the pool
(`KVPool.read_pages`: a memory copy on the step loop) and queued for the writer thread. Eviction
from memory then only drops the memory copy, with nothing to write just when memory is short,
and a restart finds every page that was written. (SGLang calls this policy write_through.)

Load back: `start_load` takes the run of a request's pages that is on disk right after its
memory match, allocates memory pages for it and hands the read to the reader thread, which
writes the KV into those pages. `poll()`, once a step, inserts what arrived into the tree and
locks it for the request; the scheduler admits the request after that (scheduler/prefetch.py),
so the step loop never waits for the disk.

For ranking, cached means in memory or on disk (`is_cached`): both sets are prefix-closed, so
their union is, and listeners hear only of changes to the union.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass
from pathlib import Path

from radixrt.cache.base import CacheStats, NoPrefixCache, PageHash, PrefixCache, cached_run, chain_hashes
from radixrt.cache.disk_tier import DiskRead, DiskTier
from radixrt.cache.identity import tier_identity
from radixrt.cache.page_pool import KVPool, PageAllocator
from radixrt.cache.radix_tree import RadixCache


@dataclass(eq=False)
class LoadJob:
    """A run of pages on its way from disk into memory, extending a locked memory match."""

    key: tuple[int, ...]  # token ids of the memory match plus the run
    salt: str | None
    hashes: list[PageHash]  # chain hashes of key's pages
    base: object  # the memory match's node, locked until the run is in the tree
    base_pages: list[int]
    pages: list[int]  # memory pages receiving the run
    read: DiskRead
    node: object | None = None  # once finished: where the loaded prefix ends, locked until released
    finished: bool = False
    cancelled: bool = False  # released before it finished: unlock as soon as it does


class TieredCache(RadixCache):
    def __init__(
        self, page_size: int, allocator: PageAllocator, pool: KVPool, tier: DiskTier,
        max_pinned_pages: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(page_size, allocator, max_pinned_pages)
        self.pool = pool
        self.tier = tier
        self._jobs: list[LoadJob] = []
        self._loading: set[PageHash] = set()  # first hash of each run being read: one read per run
        self._disk_hit_tokens = 0

    # -- the union of both tiers -------------------------------------------------------------------

    def is_cached(self, page_hash: PageHash) -> bool:
        return page_hash in self._hash_index or self.tier.index.is_ready(page_hash)

    def _added(self, hashes: Sequence[PageHash]) -> None:
        self._announce([h for h in hashes if not self.tier.index.is_ready(h)], cached=True)

    def _removed(self, hashes: Sequence[PageHash]) -> None:
        self._announce([h for h in hashes if not self.tier.index.is_ready(h)], cached=False)

    def _disk_changed(self, hashes: Sequence[PageHash], cached: bool) -> None:
        self._announce([h for h in hashes if h not in self._hash_index], cached)

    def _announce(self, hashes: list[PageHash], cached: bool) -> None:
        if hashes:
            for listener in self._listeners:
                (listener.on_cached if cached else listener.on_uncached)(hashes)

    # -- write-through -------------------------------------------------------------------------

    def insert(self, token_ids, pages, salt=None, page_hashes=None) -> int:
        already = super().insert(token_ids, pages, salt, page_hashes)
        n = len(pages)
        hashes = list(page_hashes[:n]) if page_hashes is not None else chain_hashes(token_ids, self.page_size, salt)
        known = self.tier.index.known_prefix(hashes)  # on disk or on the way
        self.tier.index.touch(hashes[:known])
        if known < n:
            parent = hashes[known - 1] if known else None
            evicted = self.tier.store(hashes[known:], parent, lambda k: self.pool.read_pages(pages[known : known + k]))
            self._disk_changed(evicted, cached=False)
        return already

    # -- load back -----------------------------------------------------------------------------

    def memory_pages(self, page_hashes: Sequence[PageHash]) -> int:
        """How many leading pages are in memory (a peek, like cached_pages, at the memory tier only)."""
        return cached_run(page_hashes, self._hash_index.__contains__)

    def disk_run(self, page_hashes: Sequence[PageHash], start: int) -> int:
        """How many of page_hashes[start:] are on disk, in a row."""
        return self.tier.index.ready_run(page_hashes, start)

    def start_load(
        self, token_ids: Sequence[int], salt: str | None, page_hashes: Sequence[PageHash], max_pages: int
    ) -> LoadJob | None:
        """Start reading the disk run that follows token_ids' memory match (at most max_pages of it)
        into free memory pages, evicting memory leaves for room. None when there is no run, it is
        being read already, or no page is free. `page_hashes`: token_ids' chain hashes."""
        match = self.match_prefix(token_ids, salt, record=False)
        start = len(match.pages)
        run = min(self.disk_run(page_hashes, start), max_pages)
        if not run or page_hashes[start] in self._loading:
            return None
        self.lock(match.node)  # before evicting: the run extends this match
        if self.allocator.num_free < run:
            self.evict(run - self.allocator.num_free)
        pages = self.allocator.alloc(min(run, self.allocator.num_free))
        if not pages:
            self.unlock(match.node)
            return None
        hashes = list(page_hashes[: start + len(pages)])
        read = self.tier.load(hashes[start:], lambda data: self.pool.write_pages(pages[: len(data)], data))
        job = LoadJob(tuple(token_ids[: len(hashes) * self.page_size]), salt, hashes, match.node, match.pages, pages,
                      read)  # fmt: skip
        self._jobs.append(job)
        self._loading.add(hashes[start])
        return job

    def release_load(self, job: LoadJob) -> None:
        """The request took its pages (it locked its own match) or went away: drop the job's lock."""
        if job.finished:
            self.unlock(job.node)
        else:
            job.cancelled = True

    def poll(self) -> None:
        self._disk_changed(self.tier.poll(), cached=True)
        for job in [j for j in self._jobs if j.read.future.done()]:
            self._finish(job)

    def _finish(self, job: LoadJob) -> None:
        """Put the pages that arrived into the tree; free the rest; move the lock onto the new end."""
        self._jobs.remove(job)
        self._loading.discard(job.hashes[len(job.base_pages)])
        valid, dropped = self.tier.finish_load(job.read)
        self._disk_changed(dropped, cached=False)
        ps, base = self.page_size, len(job.base_pages)
        end = (base + valid) * ps
        if valid:
            # On disk already, so no write-through: the tree's own insert.
            already = RadixCache.insert(self, job.key[:end], job.base_pages + job.pages[:valid], job.salt,
                                        job.hashes[: base + valid])  # fmt: skip
            self.allocator.free(job.pages[: max(already // ps - base, 0)])  # meanwhile cached by another request
            self._disk_hit_tokens += valid * ps
        self.allocator.free(job.pages[valid:])
        job.node = self.match_prefix(job.key[:end], job.salt, record=False).node
        self.lock(job.node)
        self.unlock(job.base)
        job.finished = True
        if job.cancelled:
            self.unlock(job.node)

    # -- lifecycle and accounting --------------------------------------------------------------

    @property
    def io_pending(self) -> bool:
        return bool(self._jobs) or self.tier.busy

    def wait(self, timeout: float) -> None:
        futures = [job.read.future for job in self._jobs] + self.tier.next_done()
        if futures:
            wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)

    def flush(self) -> bool:
        """Both tiers, unless a request or a read holds pages."""
        if self._jobs or not super().flush():
            return False
        self.tier.clear()
        for listener in self._listeners:
            listener.on_reset()
        return True

    def close(self) -> None:
        self.tier.close()

    def stats(self) -> CacheStats:
        s = super().stats()
        s.disk_pages = self.tier.index.num_ready
        s.disk_capacity_pages = self.tier.index.num_slots
        s.disk_hit_tokens = self._disk_hit_tokens
        s.disk_written_pages = self.tier.written
        s.disk_dropped_pages = self.tier.dropped
        s.disk_corrupt_pages = self.tier.corrupt
        s.disk_pending_io = self.tier.pending_writes + len(self._jobs)
        return s


def make_prefix_cache(
    page_size: int, allocator: PageAllocator, pool: KVPool, *, enabled: bool = True,
    max_pinned_pages: int | None = None, disk_dir: str | None = None, disk_bytes: int = 0,
    model_dir: str | None = None,
) -> PrefixCache:  # fmt: skip
    """The engine's prefix cache: none, the radix tree, or the radix tree over a disk tier."""
    if not enabled:
        if disk_dir:
            raise ValueError("the KV disk tier needs the radix cache: drop --disable-radix-cache")
        return NoPrefixCache(page_size, allocator)
    if not disk_dir:
        return RadixCache(page_size, allocator, max_pinned_pages)
    layers, _, _, kv_heads, head_dim = pool.page_shape
    Path(disk_dir).mkdir(parents=True, exist_ok=True)
    identity = tier_identity(model_dir, layers, kv_heads, head_dim, pool.dtype, page_size,
                             memo=Path(disk_dir) / "fingerprints.json")  # fmt: skip
    tier = DiskTier(disk_dir, disk_bytes, identity, pool.page_shape, pool.dtype)
    return TieredCache(page_size, allocator, pool, tier, max_pinned_pages)
