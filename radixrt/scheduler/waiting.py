"""The waiting queue, keeping each request's cached prefix length current as the cache changes.

Ranking by cached prefix (lpm) used to ask the cache about every waiting request each step:
22 ms at 5,000 waiting. Here a request's cached length n (whole pages, every tier counted)
changes only when the cache says so (base.CacheListener), and only for the requests the change
can reach, because cached prefixes are prefix-closed:

    request hashes   h0  h1  h2  h3 | h4  h5  h6          n = 4
                                 ▲    ▲
                          anchor ┘    └ frontier
    h4 becomes cached  -> only requests whose frontier is h4 can grow
    h3 stops being     -> only requests whose anchor is h3 can shrink

A heap keyed (-n, queue position) then yields the best k candidates in O(k log n), so a step's
ordering cost no longer grows with the queue. Entries are invalidated lazily (a version per
request). Queue positions: append takes the next one up, appendleft (a preempted request) the
next one down, so (-n, position) orders exactly as a stable sort of the queue by -n would.
Requests waiting longer than the starvation timeout leave the ranking for a heap of their own,
in queue order, which goes first.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

from radixrt.cache.base import PageHash, PrefixCache
from radixrt.request import Req


class _Waiting:
    __slots__ = ("req", "pos", "hashes", "n", "version", "starving")

    def __init__(self, req: Req, pos: int) -> None:
        self.req = req
        self.pos = pos
        self.hashes: Sequence[PageHash] = ()
        self.n = 0
        self.version = 0  # -1 once the request left the queue
        self.starving = False


class WaitingQueue:
    def __init__(self, cache: PrefixCache, rank_by_cache: bool) -> None:
        self.cache = cache
        self._track = rank_by_cache and cache.enabled
        self._head: dict[Req, _Waiting] = {}  # appendleft'ed: queue order is reversed insertion
        self._tail: dict[Req, _Waiting] = {}  # append'ed: queue order is insertion
        self._low, self._high = 0, 0  # the next positions down and up
        self._ranked: list[tuple[int, int, int, _Waiting]] = []  # (-n, pos, version, item)
        self._by_age: list[tuple[float, int, _Waiting]] = []  # (arrival, pos, item): who starts to starve
        self._starving: list[tuple[int, _Waiting]] = []  # (pos, item)
        self._frontier: dict[PageHash, set[_Waiting]] = {}
        self._anchor: dict[PageHash, set[_Waiting]] = {}
        if self._track:
            cache.subscribe(self)

    # -- a deque's interface -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._head) + len(self._tail)

    def __bool__(self) -> bool:
        return bool(self._head or self._tail)

    def __contains__(self, req: Req) -> bool:
        return req in self._tail or req in self._head

    def __iter__(self) -> Iterator[Req]:
        """Queue order: preempted requests (last preempted first), then arrivals."""
        yield from reversed(list(self._head))
        yield from list(self._tail)

    def append(self, req: Req) -> None:
        self._tail[req] = self._enter(req, self._high)
        self._high += 1

    def appendleft(self, req: Req) -> None:
        self._low -= 1
        self._head[req] = self._enter(req, self._low)

    def remove(self, req: Req) -> None:
        item = self._tail.pop(req, None) or self._head.pop(req)
        item.version = -1
        self._unregister(item)

    # -- ordering ----------------------------------------------------------------------------------

    def starving(self, cutoff: float, limit: int) -> list[Req]:
        """Up to `limit` requests that arrived before `cutoff`, in queue order."""
        while self._by_age and self._by_age[0][0] < cutoff:
            _, pos, item = heapq.heappop(self._by_age)
            if item.version >= 0:
                item.starving = True
                self._unregister(item)
                heapq.heappush(self._starving, (pos, item))
        return self._take(self._starving, limit, lambda e: e[1].version >= 0)

    def ranked(self, limit: int) -> list[Req]:
        """Up to `limit` requests that are not starving: longest cached prefix first when ranking by
        cache, queue order among equals (and for everyone otherwise)."""
        return self._take(self._ranked, limit, lambda e: e[2] == e[3].version and not e[3].starving)

    def fresh(self) -> list[Req]:
        """Every request that is not starving, in queue order (for policies that rank them all)."""
        items = [*reversed(self._head.values()), *self._tail.values()]
        return [item.req for item in items if not item.starving]

    def cached_pages(self, req: Req) -> int:
        """The cached length (whole pages) this queue ranks req by."""
        item = self._tail.get(req) or self._head[req]
        return item.n

    def _take(self, heap: list, limit: int, live) -> list[Req]:
        """The first `limit` live entries of heap (dead ones are dropped on the way); heap unchanged otherwise."""
        out = []
        while heap and len(out) < limit:
            entry = heapq.heappop(heap)
            if live(entry):
                out.append(entry)
        for entry in out:
            heapq.heappush(heap, entry)
        return [entry[-1].req for entry in out]

    # -- the cache's news (base.CacheListener) ------------------------------------------------------

    def on_cached(self, hashes: Sequence[PageHash]) -> None:
        for h in hashes:
            for item in self._frontier.pop(h, ()):
                self._rerank(item)

    def on_uncached(self, hashes: Sequence[PageHash]) -> None:
        for h in hashes:
            for item in self._anchor.pop(h, ()):
                self._rerank(item)

    def on_reset(self) -> None:
        for item in [*self._head.values(), *self._tail.values()]:
            if not item.starving:
                self._rerank(item)

    # -- bookkeeping -------------------------------------------------------------------------------

    def _enter(self, req: Req, pos: int) -> _Waiting:
        if len(self._by_age) + len(self._starving) > 2 * len(self) + 64:  # mostly dead entries: rebuild
            self._by_age = [e for e in self._by_age if e[2].version >= 0 and not e[2].starving]
            self._starving = [e for e in self._starving if e[1].version >= 0]
            heapq.heapify(self._by_age)
            heapq.heapify(self._starving)
        item = _Waiting(req, pos)
        heapq.heappush(self._by_age, (req.arrival_time, pos, item))
        if self._track:
            item.hashes = req.page_hashes(self.cache.page_size)
            item.n = self.cache.cached_pages(item.hashes)
            self._register(item)
        self._push(item)
        return item

    def _rerank(self, item: _Waiting) -> None:
        """The cache changed around item's frontier or anchor: walk n to its new value."""
        self._unregister(item)
        hashes, n = item.hashes, item.n
        while n < len(hashes) and self.cache.is_cached(hashes[n]):
            n += 1
        while n > 0 and not self.cache.is_cached(hashes[n - 1]):
            n -= 1
        item.n = n
        item.version += 1
        self._register(item)
        self._push(item)

    def _push(self, item: _Waiting) -> None:
        if len(self._ranked) > 2 * len(self) + 64:  # mostly dead entries: rebuild
            self._ranked = [e for e in self._ranked if e[2] == e[3].version and not e[3].starving]
            heapq.heapify(self._ranked)
        heapq.heappush(self._ranked, (-item.n if self._track else 0, item.pos, item.version, item))

    def _register(self, item: _Waiting) -> None:
        if not self._track:
            return
        if item.n < len(item.hashes):
            self._frontier.setdefault(item.hashes[item.n], set()).add(item)
        if item.n > 0:
            self._anchor.setdefault(item.hashes[item.n - 1], set()).add(item)

    def _unregister(self, item: _Waiting) -> None:
        if not self._track:
            return
        for index, i in ((self._frontier, item.n), (self._anchor, item.n - 1)):
            if 0 <= i < len(item.hashes):
                waiting = index.get(item.hashes[i])
                if waiting is not None:
                    waiting.discard(item)
                    if not waiting:
                        del index[item.hashes[i]]
