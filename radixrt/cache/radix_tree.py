"""RadixCache: KV pages shared between requests whose token ids start the same way.

A radix tree over token ids at page granularity. Each edge holds a run of whole pages: its
key is the run's token ids (a multiple of page_size long) and its value the page ids that
hold their KV. Children are found by their first page of token ids::

    page_size = 2, cached: [1 2 3 4 5 6] and [1 2 3 4 7 8 9 9]

    root ── (1,2) → node A  key (1,2,3,4)  pages [p0, p1]
                      ├── (5,6) → node B  key (5,6)      pages [p2]
                      └── (7,8) → node C  key (7,8,9,9)  pages [p3, p4]

A match that ends inside an edge splits it, so a match always ends at a node; that node is
the handle the scheduler locks. A locked node and its ancestors are never evicted. Eviction
removes unlocked leaves, least recently used first; a parent becomes a leaf (and a
candidate) when its last child goes. Each cache_salt gets its own root, so requests only
share with requests carrying the same salt; salt None is the shared default root. Pinned
prefixes (pins.py) are locks that no request owns. Listeners hear of every page hash that
enters or leaves the cache, so the waiting queue keeps its ranks without re-ranking.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

from radixrt.cache.base import (
    CacheListener,
    CacheStats,
    MatchResult,
    PageHash,
    PrefixCache,
    cached_run,
    chain_hashes,
)
from radixrt.cache.dfs_weight import dfs_weight_order
from radixrt.cache.ngram_index import CachedNgrams
from radixrt.cache.page_pool import PageAllocator
from radixrt.cache.pins import PINNED_SHARE, PinnedPrefixes


class _Node:
    __slots__ = ("key", "pages", "hashes", "children", "parent", "lock_ref", "access")

    def __init__(
        self, key: tuple[int, ...], pages: list[int], hashes: list[int], parent: _Node | None, access: int
    ) -> None:
        self.key = key  # token ids on the edge into this node, a multiple of page_size long
        self.pages = pages  # len(key) // page_size page ids
        self.hashes = hashes  # chain hash of the whole prefix ending at each of those pages
        self.children: dict[tuple[int, ...], _Node] = {}  # by the child's first page of token ids
        self.parent = parent  # None for a root and for a node that was evicted
        self.lock_ref = 0
        self.access = access  # logical clock of the last match/insert that reached this node


class _Root(_Node):
    __slots__ = ("salt",)

    def __init__(self, salt: str | None) -> None:
        super().__init__((), [], [], None, 0)
        self.salt = salt


class RadixCache(PrefixCache):
    def __init__(self, page_size: int, allocator: PageAllocator, max_pinned_pages: int | None = None) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive (got {page_size})")
        self.page_size = page_size
        self.allocator = allocator
        self._roots: dict[str | None, _Root] = {None: _Root(None)}
        self._clock = 0
        # Eviction candidates as (access, seq, node), checked lazily when popped: an entry may
        # be stale (node since locked, grown children, evicted, or touched again).
        self._heap: list[tuple[int, int, _Node]] = []
        self._seq = itertools.count()
        self._evictable = 0  # pages in unlocked nodes
        self._protected = 0  # pages in locked nodes
        self._num_nodes = 0
        self._hit_tokens = 0
        self._query_tokens = 0
        self._evicted_tokens = 0
        # Chain hashes of every cached page prefix: answers "how much of this is cached?" in
        # O(log n) set lookups without walking the tree (see cached_pages).
        self._hash_index: set[PageHash] = set()
        self._listeners: list[CacheListener] = []
        self._ngrams: CachedNgrams | None = None  # built on the first continuation() call, then kept current
        if max_pinned_pages is None:
            max_pinned_pages = int(allocator.num_pages * PINNED_SHARE)
        self.pins = PinnedPrefixes(self, max_pinned_pages)

    # -- lookups -----------------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int], salt: str | None = None, record: bool = True) -> MatchResult:
        tokens = self._whole_pages(token_ids)
        root = self._roots.get(salt)
        if root is None:  # nothing cached under this salt yet; locking a root is a no-op
            node, pages = self._roots[None], []
        else:
            node, _ = self._walk(root, tokens)
            pages = self._path_pages(node)
        num_tokens = len(pages) * self.page_size
        if record:
            self._query_tokens += len(token_ids)
            self._hit_tokens += num_tokens
        return MatchResult(node=node, pages=pages, num_tokens=num_tokens)

    def cached_pages(self, page_hashes: Sequence[PageHash]) -> int:
        return cached_run(page_hashes, self.is_cached)  # prefix-closed: only leaves are evicted

    def is_cached(self, page_hash: PageHash) -> bool:
        return page_hash in self._hash_index

    def subscribe(self, listener: CacheListener) -> None:
        self._listeners.append(listener)

    def _added(self, hashes: Sequence[PageHash]) -> None:
        """These hashes just entered the tree (a tiered cache tells listeners only of real news)."""
        for listener in self._listeners:
            listener.on_cached(hashes)

    def _removed(self, hashes: Sequence[PageHash]) -> None:
        for listener in self._listeners:
            listener.on_uncached(hashes)

    def dfs_order(self, sequences: Sequence[tuple[Sequence[int], str | None]]) -> list[int]:
        return dfs_weight_order(self, sequences)

    def continuation(self, context: Sequence[int], salt: str | None, max_tokens: int, window: int) -> list[int]:
        if self._ngrams is None or self._ngrams.window != window:
            self._ngrams = CachedNgrams(window)
            self._ngrams.rebuild(self._roots)
        return self._ngrams.continuation(salt, context, max_tokens)

    def insert(
        self,
        token_ids: Sequence[int],
        pages: Sequence[int],
        salt: str | None = None,
        page_hashes: Sequence[PageHash] | None = None,
    ) -> int:
        """Cache token_ids with their pages; return how many leading tokens were cached before.

        The tree takes ownership of pages[already // page_size:]. Before that point the tree
        keeps its own pages, so any page the caller allocated there is a duplicate and the
        caller frees it. Example with page_size 1: a request matched [a b] on pages [7 8],
        computed [c d] into its own pages [20 21], and meanwhile another request cached
        [a b c]. insert([a b c d], [7 8 20 21]) returns 3: the tree now owns page 21, and the
        caller frees page 20 (its copy of c), i.e. pages[len(matched pages) : 3].
        """
        ps = self.page_size
        if len(token_ids) != len(pages) * ps:
            raise ValueError(f"{len(token_ids)} tokens do not fill {len(pages)} pages of {ps}")
        tokens = self._whole_pages(token_ids)
        if not tokens:
            return 0
        root = self._roots.get(salt)
        if root is None:
            root = self._roots[salt] = _Root(salt)
        node, already = self._walk(root, tokens)
        if already < len(tokens):
            hashes = list(page_hashes or chain_hashes(tokens, ps, salt))[already // ps : len(pages)]
            self._hash_index.update(hashes)
            leaf = _Node(tokens[already:], list(pages[already // ps :]), hashes, node, self._clock)
            node.children[leaf.key[:ps]] = leaf
            self._evictable += len(leaf.pages)
            self._num_nodes += 1
            self._push(leaf)
            self._added(hashes)
            if self._ngrams is not None:
                self._ngrams.add(salt, tokens, already, leaf)
                if len(self._ngrams) > 2 * (self._evictable + self._protected) * ps + 1024:  # mostly stale
                    self._ngrams.rebuild(self._roots)
        return already

    def _whole_pages(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        if hasattr(token_ids, "tolist"):  # a tensor or an array
            token_ids = token_ids.tolist()
        tokens = tuple(token_ids)  # free when token_ids is already a tuple
        n = len(tokens) // self.page_size * self.page_size
        return tokens if n == len(tokens) else tokens[:n]

    def _walk(self, root: _Root, tokens: tuple[int, ...]) -> tuple[_Node, int]:
        """Follow tokens down from root, touching each node on the way; split the edge where
        the match ends inside one. Returns the deepest matched node and the matched length."""
        ps = self.page_size
        self._clock += 1
        node, pos = root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos : pos + ps])
            if child is None:
                break
            key = child.key
            if tokens[pos : pos + len(key)] == key:  # the whole edge matches: one C-level compare
                node, pos = child, pos + len(key)
                node.access = self._clock
                continue
            n = self._matching_pages(key, tokens, pos)
            node, pos = self._split(child, n), pos + n * ps
            node.access = self._clock
            break
        return node, pos

    def _matching_pages(self, key: tuple[int, ...], tokens: tuple[int, ...], pos: int) -> int:
        """How many whole pages of key match tokens[pos:], knowing the first does and not all
        of key does: a binary search over slice compares, no per-token Python loop."""
        ps = self.page_size
        lo, hi = 1, min(len(key), len(tokens) - pos) // ps  # lo pages match; more than hi cannot
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if key[: mid * ps] == tokens[pos : pos + mid * ps]:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _split(self, node: _Node, num_pages: int) -> _Node:
        """Cut node's edge after num_pages pages; return the new upper node. The lower part
        keeps node's identity, so handles held on it still mean the same prefix."""
        at = num_pages * self.page_size
        upper = _Node(node.key[:at], node.pages[:num_pages], node.hashes[:num_pages], node.parent, node.access)
        upper.lock_ref = node.lock_ref  # every lock through node also goes through upper
        node.parent.children[node.key[: self.page_size]] = upper
        node.key, node.pages, node.parent = node.key[at:], node.pages[num_pages:], upper
        node.hashes = node.hashes[num_pages:]
        upper.children[node.key[: self.page_size]] = node
        self._num_nodes += 1
        return upper

    @staticmethod
    def _path_pages(node: _Node) -> list[int]:
        runs = []
        while node.parent is not None:
            runs.append(node.pages)
            node = node.parent
        return list(itertools.chain.from_iterable(reversed(runs)))

    # -- locks and eviction ------------------------------------------------------------------

    def lock(self, node: _Node) -> None:
        self._check_live(node)
        while node.parent is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.pages)
                self._protected += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: _Node) -> None:
        self._check_live(node)
        # An ancestor's count is at least its descendant's, so checking the first is enough.
        if node.parent is not None and node.lock_ref == 0:
            raise RuntimeError("unlock without a matching lock")
        while node.parent is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.pages)
                self._protected -= len(node.pages)
                if not node.children:
                    self._push(node)
            node = node.parent

    @staticmethod
    def _check_live(node: _Node) -> None:
        if node.parent is None and not isinstance(node, _Root):
            raise RuntimeError("this node was evicted: lock the handle from a fresh match_prefix")

    def evict(self, num_pages: int) -> int:
        freed: list[int] = []
        gone: list[PageHash] = []
        while len(freed) < num_pages and self._heap:
            access, _, node = heapq.heappop(self._heap)
            if node.parent is None or node.children or node.lock_ref:
                continue  # evicted, no longer a leaf, or locked: not a candidate now
            if access != node.access:
                self._push(node)  # touched since it was pushed: requeue at its real age
                continue
            parent = node.parent
            del parent.children[node.key[: self.page_size]]
            node.parent = None
            freed += node.pages
            gone += node.hashes
            self._hash_index.difference_update(node.hashes)
            self._evictable -= len(node.pages)
            self._num_nodes -= 1
            if parent.children:
                continue
            if isinstance(parent, _Root):
                if parent.salt is not None:
                    del self._roots[parent.salt]
            elif parent.lock_ref == 0:
                self._push(parent)
        self.allocator.free(freed)
        self._evicted_tokens += len(freed) * self.page_size
        if gone:
            self._removed(gone)
        return len(freed)

    def _push(self, node: _Node) -> None:
        """Queue a node that just became an eviction candidate (an unlocked leaf in the tree)."""
        if len(self._heap) > 2 * self._num_nodes + 64:  # mostly stale entries: rebuild, O(1) amortized
            self._heap = [(n.access, next(self._seq), n) for n in self._nodes() if not n.children and not n.lock_ref]
            heapq.heapify(self._heap)  # node is a candidate, so it is in here already
            return
        heapq.heappush(self._heap, (node.access, next(self._seq), node))

    def _nodes(self) -> list[_Node]:
        """Every non-root node (a full walk: only for heap rebuilds and flush)."""
        out: list[_Node] = []
        stack: list[_Node] = list(self._roots.values())
        while stack:
            children = stack.pop().children.values()
            out += children
            stack += children
        return out

    def flush(self) -> bool:
        """Drop every cached page, pins included, unless a request holds a lock. Hit statistics are kept."""
        pins = self.pins.release_all()
        if self._protected:
            self.pins.restore(pins)
            return False
        nodes = self._nodes()
        self.allocator.free([p for n in nodes for p in n.pages])
        for n in nodes:
            n.parent = None
        self._roots = {None: _Root(None)}
        self._heap.clear()
        self._hash_index.clear()
        self._evictable = self._num_nodes = 0
        if self._ngrams is not None:
            self._ngrams.rebuild(self._roots)
        for listener in self._listeners:
            listener.on_reset()
        return True

    # -- accounting --------------------------------------------------------------------------

    @property
    def evictable_pages(self) -> int:
        return self._evictable

    @property
    def protected_pages(self) -> int:
        return self._protected

    def stats(self) -> CacheStats:
        ps = self.page_size
        cached = self._evictable + self._protected
        return CacheStats(
            cached_tokens=cached * ps,
            evictable_tokens=self._evictable * ps,
            protected_tokens=self._protected * ps,
            cached_pages=cached,
            hit_tokens=self._hit_tokens,
            query_tokens=self._query_tokens,
            hit_rate=self._hit_tokens / self._query_tokens if self._query_tokens else 0.0,
            evicted_tokens=self._evicted_tokens,
            num_nodes=self._num_nodes,
            pinned_pages=self.pins.pinned_pages,
            num_pins=len(self.pins),
        )
