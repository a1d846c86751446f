"""The prefix-cache interface the scheduler programs against.

Two implementations: `RadixCache` (radix_tree.py) shares KV pages between requests whose
token ids start the same way; `NoPrefixCache` (here) keeps nothing, for
`disable_radix_cache=True`. The engine calls the same methods either way:

    m = cache.match_prefix(ids)          # reuse m.pages for the first m.num_tokens tokens
    cache.lock(m.node)                   # while the request runs, its prefix stays cached
    ...allocate pages for the rest, prefill, decode...
    n = cache.insert(ids, pages)         # on finish: hand the pages to the cache
    allocator.free(pages[len(m.pages) : n // page_size])   # duplicates, see insert()
    cache.unlock(m.node)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Protocol

from radixrt.cache.page_pool import PageAllocator

PageHash = bytes  # a chain hash (see chain_hashes): 16 bytes naming a page-aligned prefix under a salt


def chain_hashes(
    token_ids: Sequence[int], page_size: int, salt: str | None = None, known: Sequence[PageHash] = ()
) -> list[PageHash]:
    """One hash per whole page: hash i identifies token_ids[: (i + 1) * page_size] under `salt`.

    Each hash folds in the previous one, so equal hashes mean equal prefixes. They are 128-bit
    blake2b digests, stable across processes: the disk tier keys pages by them, so a collision
    would load the wrong KV, and a restarted server must compute the same ones. The salt enters
    only hashed. `known` (hashes computed earlier for a shorter version of the same sequence) is
    extended, not redone.
    """
    out = list(known)
    h = out[-1] if out else _salt_seed(salt)
    start, end = len(out), len(token_ids) // page_size
    if end <= start:
        return out
    data = array("I", token_ids[start * page_size : end * page_size]).tobytes()
    step = page_size * 4
    for i in range(end - start):
        h = blake2b(h + data[i * step : (i + 1) * step], digest_size=16).digest()
        out.append(h)
    return out


def cached_run(page_hashes: Sequence[PageHash], present: Callable[[PageHash], bool]) -> int:
    """How many leading page_hashes are present, for a prefix-closed set (every cached prefix's
    own prefixes are cached too): a binary search, O(log n) lookups."""
    lo, hi = 0, len(page_hashes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if present(page_hashes[mid - 1]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _salt_seed(salt: str | None) -> PageHash:
    tag = b"radixrt\0" if salt is None else b"radixrt\1" + salt.encode("utf-8", "surrogatepass")
    return blake2b(tag, digest_size=16).digest()


@dataclass
class MatchResult:
    node: object  # opaque handle for lock/unlock: the deepest matched node (a root when nothing matched)
    pages: list[int]  # page ids of the cached prefix, in order
    num_tokens: int  # == len(pages) * page_size


@dataclass
class CacheStats:
    cached_tokens: int = 0
    evictable_tokens: int = 0  # cached and unlocked: evict() can free them
    protected_tokens: int = 0  # cached and locked by a running request
    cached_pages: int = 0
    hit_tokens: int = 0  # over recorded match_prefix calls
    query_tokens: int = 0
    hit_rate: float = 0.0  # hit_tokens / query_tokens
    evicted_tokens: int = 0
    num_nodes: int = 0
    pinned_pages: int = 0  # distinct pages under pinned prefixes (see pins.py)
    num_pins: int = 0
    # The disk tier (tiered.py), all zero without one:
    disk_pages: int = 0  # pages on disk, ready to load
    disk_capacity_pages: int = 0
    disk_hit_tokens: int = 0  # tokens loaded back from disk instead of recomputed
    disk_written_pages: int = 0
    disk_dropped_pages: int = 0  # not written: the write queue was full or the disk failed
    disk_corrupt_pages: int = 0  # failed their checksum on load: skipped, dropped from the index
    disk_pending_io: int = 0  # reads and writes in flight


class CacheListener(Protocol):
    """Told when page hashes start or stop being cached, so the waiting queue keeps its ranks
    current without re-ranking (scheduler/waiting.py). Called after the change is visible
    through `is_cached`."""

    def on_cached(self, hashes: Sequence[PageHash]) -> None: ...

    def on_uncached(self, hashes: Sequence[PageHash]) -> None: ...

    def on_reset(self) -> None: ...


class PrefixCache(ABC):
    page_size: int
    enabled: bool = True  # False: the engine skips work that only feeds a cache
    pins = None  # a PinnedPrefixes where pinning is supported (the radix tree)

    @abstractmethod
    def match_prefix(self, token_ids: Sequence[int], salt: str | None = None, record: bool = True) -> MatchResult:
        """The longest cached prefix of token_ids, in whole pages (a trailing partial page never matches).

        Only requests with the same `salt` share pages. `record=False` peeks without counting
        the call in the hit statistics (the scheduler ranks waiting requests this way).
        """

    @abstractmethod
    def cached_pages(self, page_hashes: Sequence[PageHash]) -> int:
        """How many leading pages of a sequence are cached, given its `chain_hashes`.

        A side-effect-free peek in O(log n) set lookups, so the scheduler can rank thousands
        of waiting requests every step; admission still matches through the tree.
        """

    def is_cached(self, page_hash: PageHash) -> bool:
        """Is the prefix this chain hash names cached (in any tier)? Cached prefixes are prefix-closed."""
        return False

    def subscribe(self, listener: CacheListener) -> None:
        """Tell `listener` about every change to the set of cached page hashes."""

    def poll(self) -> None:
        """Apply background work that finished (the disk tier's reads and writes); never blocks."""

    @property
    def io_pending(self) -> bool:
        """Background work is in flight or not yet applied: keep stepping to poll() it."""
        return False

    def wait(self, timeout: float) -> None:
        """Block until some background work finishes, or timeout: an idle step loop must not spin
        (it would hold the GIL the I/O threads need)."""

    def close(self) -> None:
        """Finish background work and persist what should outlive the process."""

    def continuation(self, context: Sequence[int], salt: str | None, max_tokens: int, window: int) -> list[int]:
        """Up to max_tokens tokens that followed context's last `window` tokens in a cached sequence under the
        same salt (the latest such occurrence), or []: draft tokens for speculative decoding. A peek: not
        counted in the hit statistics, and it touches no node's recency."""
        return []

    @abstractmethod
    def dfs_order(self, sequences: Sequence[tuple[Sequence[int], str | None]]) -> list[int]:
        """Indices of (token_ids, salt) `sequences` in SGLang's DFS-weight order: depth first
        through the cached prefixes, the subtree that most sequences match first, so that the
        sequences sharing a subtree run back to back. Not counted in the hit statistics."""

    @abstractmethod
    def insert(
        self,
        token_ids: Sequence[int],
        pages: Sequence[int],
        salt: str | None = None,
        page_hashes: Sequence[PageHash] | None = None,
    ) -> int:
        """Cache token_ids (whole pages: len(token_ids) == len(pages) * page_size); return how
        many leading tokens were already cached. The cache takes ownership of
        pages[already // page_size:]; the caller frees its own duplicates before that point.
        `page_hashes` (the sequence's chain_hashes, if the caller has them) saves recomputing."""

    @abstractmethod
    def lock(self, node: object) -> None:
        """Protect node and its ancestors from eviction (one lock reference each)."""

    @abstractmethod
    def unlock(self, node: object) -> None:
        """Drop the reference lock() took; unlocking more than locking raises."""

    @abstractmethod
    def evict(self, num_pages: int) -> int:
        """Free at least num_pages unlocked pages if there are that many; return pages freed."""

    @abstractmethod
    def flush(self) -> bool:
        """Drop everything if nothing is locked (True); otherwise change nothing (False)."""

    @abstractmethod
    def stats(self) -> CacheStats: ...

    @property
    @abstractmethod
    def evictable_pages(self) -> int: ...

    @property
    @abstractmethod
    def protected_pages(self) -> int: ...


class NoPrefixCache(PrefixCache):
    """A cache that keeps nothing: match finds nothing, insert frees the pages at once."""

    enabled = False

    _ROOT = object()

    def __init__(self, page_size: int, allocator: PageAllocator) -> None:
        self.page_size = page_size
        self.allocator = allocator

    def match_prefix(self, token_ids: Sequence[int], salt: str | None = None, record: bool = True) -> MatchResult:
        return MatchResult(node=self._ROOT, pages=[], num_tokens=0)

    def cached_pages(self, page_hashes: Sequence[PageHash]) -> int:
        return 0

    def dfs_order(self, sequences: Sequence[tuple[Sequence[int], str | None]]) -> list[int]:
        return list(range(len(sequences)))

    def insert(self, token_ids, pages, salt=None, page_hashes=None) -> int:
        if len(token_ids) != len(pages) * self.page_size:
            raise ValueError(f"{len(token_ids)} tokens do not fill {len(pages)} pages of {self.page_size}")
        self.allocator.free(pages)  # nothing was cached, so every page is ours to free
        return 0

    def lock(self, node: object) -> None:
        pass

    def unlock(self, node: object) -> None:
        pass

    def evict(self, num_pages: int) -> int:
        return 0

    def flush(self) -> bool:
        return True

    def stats(self) -> CacheStats:
        return CacheStats()

    @property
    def evictable_pages(self) -> int:
        return 0

    @property
    def protected_pages(self) -> int:
        return 0
