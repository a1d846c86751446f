"""RadixCache: unit tests for each mechanism, and a stateful property test that drives the
tree the way the engine does (match, lock, allocate the rest, insert, free duplicates,
unlock) against a reference model: a dict from each cached page-aligned prefix to its page."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from radixrt.cache.base import NoPrefixCache, chain_hashes
from radixrt.cache.disk_tier import DiskTier
from radixrt.cache.page_pool import KVPool, PageAllocator
from radixrt.cache.pins import pin_cap
from radixrt.cache.radix_tree import RadixCache
from radixrt.cache.tiered import TieredCache


class RecordingAllocator(PageAllocator):
    """A PageAllocator that remembers which pages came back, so a test can see what evict freed."""

    def __init__(self, num_pages: int) -> None:
        super().__init__(num_pages)
        self.freed: list[int] = []

    def free(self, pages) -> None:
        pages = list(pages)
        super().free(pages)
        self.freed += pages


def make(page_size: int = 1, num_pages: int = 64) -> tuple[RadixCache, PageAllocator]:
    alloc = PageAllocator(num_pages)
    return RadixCache(page_size, alloc), alloc


def cache_seq(cache: RadixCache, alloc: PageAllocator, ids: list[int], salt: str | None = None) -> list[int]:
    """Insert ids as a finished request would, with fresh pages; return the tree's pages for ids."""
    pages = alloc.alloc(len(ids) // cache.page_size)
    already = cache.insert(ids, pages, salt)
    alloc.free(pages[: already // cache.page_size])  # duplicates
    return cache.match_prefix(ids, salt, record=False).pages


def tree_nodes(cache: RadixCache):
    """(salt, prefix tokens up to and including the node, node) for every non-root node."""
    out = []
    for salt, root in cache._roots.items():
        stack = [((), root)]
        while stack:
            prefix, node = stack.pop()
            for child in node.children.values():
                out.append((salt, prefix + child.key, child))
                stack.append((prefix + child.key, child))
    return out


# -- unit tests ----------------------------------------------------------------------------


def test_split_inside_an_edge():
    cache, alloc = make(page_size=2)
    pages = cache_seq(cache, alloc, [1, 2, 3, 4, 5, 6, 7, 8])
    assert cache.stats().num_nodes == 1
    m = cache.match_prefix([1, 2, 3, 4, 9, 9, 7, 8])
    assert (m.num_tokens, m.pages) == (4, pages[:2])
    assert cache.stats().num_nodes == 2  # the edge was cut after two pages
    assert m.node.key == (1, 2, 3, 4) and len(m.node.children) == 1
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]).pages == pages  # the full path still matches


def test_mismatch_inside_a_page_matches_only_whole_pages():
    cache, alloc = make(page_size=4)
    pages = cache_seq(cache, alloc, list(range(12)))
    m = cache.match_prefix([0, 1, 2, 3, 4, 5, 9, 9, 8, 9, 10, 11])  # differs in page 1
    assert (m.num_tokens, m.pages) == (4, pages[:1])


def test_trailing_partial_page_never_matches():
    cache, alloc = make(page_size=4)
    pages = cache_seq(cache, alloc, list(range(8)))
    assert cache.match_prefix(list(range(7))).pages == pages[:1]
    assert cache.match_prefix(list(range(10))).pages == pages
    assert cache.match_prefix([0, 1, 2]).num_tokens == 0


def test_insert_returns_already_cached_length():
    cache, alloc = make(page_size=2)
    p1 = alloc.alloc(2)
    assert cache.insert([1, 2, 3, 4], p1) == 0
    p2 = alloc.alloc(3)
    assert cache.insert([1, 2, 3, 4, 5, 6], p2) == 4  # p2[:2] are duplicates: the caller frees them
    alloc.free(p2[:2])
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).pages == p1 + p2[2:]
    assert cache.insert([1, 2, 3, 4, 5, 6], p1 + p2[2:]) == 6  # the tree's own pages: nothing to free
    assert cache.insert([1, 2, 7, 7], [p1[0], alloc.alloc(1)[0]]) == 2
    assert alloc.num_free + cache.stats().cached_pages == alloc.num_pages


def test_insert_rejects_partial_pages():
    cache, alloc = make(page_size=2)
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3], alloc.alloc(2))


def test_evict_lru_order():
    cache, alloc = make(page_size=1)
    a = cache_seq(cache, alloc, [1, 1, 1])
    b = cache_seq(cache, alloc, [2, 2, 2])
    c = cache_seq(cache, alloc, [3, 3])
    cache.match_prefix([1, 1, 1])  # a is now the most recently used, b the least
    assert cache.evict(1) == 3  # a whole leaf goes: b
    assert cache.match_prefix([2, 2, 2]).num_tokens == 0 and set(b) <= set(alloc._free)
    assert cache.evict(1) == 2  # then c
    assert cache.match_prefix([3, 3]).num_tokens == 0 and set(c) <= set(alloc._free)
    assert cache.match_prefix([1, 1, 1]).pages == a


def test_parent_becomes_evictable_after_its_children():
    cache, alloc = make(page_size=1)
    cache_seq(cache, alloc, [1, 2, 3])
    cache_seq(cache, alloc, [1, 2, 4])  # tree: (1,2) -> {(3), (4)}
    assert cache.stats().num_nodes == 3
    assert cache.evict(1) == 1  # one child
    assert cache.evict(1) == 1  # the other child
    assert cache.stats().num_nodes == 1 and cache.match_prefix([1, 2]).num_tokens == 2
    assert cache.evict(1) == 2  # now the parent is a leaf
    assert cache.stats().cached_pages == 0 and alloc.num_free == alloc.num_pages


def test_locked_nodes_are_never_evicted():
    cache, alloc = make(page_size=1)
    cache_seq(cache, alloc, [1, 2, 3])
    cache_seq(cache, alloc, [1, 2, 4])
    cache_seq(cache, alloc, [5, 5])
    m = cache.match_prefix([1, 2, 3, 9])
    cache.lock(m.node)
    assert (cache.protected_pages, cache.evictable_pages) == (3, 3)
    assert cache.evict(100) == 3  # [4] and [5 5]; the locked path stays
    assert cache.match_prefix([1, 2, 3]).pages == m.pages
    assert cache.flush() is False
    cache.unlock(m.node)
    with pytest.raises(RuntimeError):
        cache.unlock(m.node)
    assert (cache.protected_pages, cache.evictable_pages) == (0, 3)
    assert cache.evict(100) == 3
    with pytest.raises(RuntimeError):  # a handle to an evicted node
        cache.lock(m.node)


def test_salts_isolate():
    cache, alloc = make(page_size=2)
    pages = cache_seq(cache, alloc, [1, 2, 3, 4], salt="alice")
    assert cache.match_prefix([1, 2, 3, 4]).num_tokens == 0
    assert cache.match_prefix([1, 2, 3, 4], salt="bob").num_tokens == 0
    assert cache.match_prefix([1, 2, 3, 4], salt="alice").pages == pages
    shared = cache_seq(cache, alloc, [1, 2, 3, 4])
    assert not set(shared) & set(pages)
    assert cache.evict(100) == 4
    assert list(cache._roots) == [None]  # the empty salt root is gone


def test_flush():
    cache, alloc = make(page_size=2)
    cache_seq(cache, alloc, [1, 2, 3, 4])
    cache_seq(cache, alloc, [1, 2, 5, 6], salt="s")
    assert cache.flush() is True
    assert alloc.num_free == alloc.num_pages and cache.stats().num_nodes == 0
    assert cache.match_prefix([1, 2, 3, 4]).num_tokens == 0


def test_stats_and_hit_rate():
    cache, alloc = make(page_size=2)
    cache_seq(cache, alloc, [1, 2, 3, 4])
    cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])  # 4 of 8 tokens hit
    cache.match_prefix([9, 9, 9, 9])  # 0 of 4
    cache.match_prefix([1, 2, 3, 4], record=False)  # a peek: not counted
    s = cache.stats()
    assert (s.hit_tokens, s.query_tokens, s.hit_rate) == (4, 12, 4 / 12)
    assert (s.cached_tokens, s.cached_pages, s.evictable_tokens, s.protected_tokens) == (4, 2, 4, 0)
    cache.evict(1)
    assert cache.stats().evicted_tokens == 4


def test_no_prefix_cache_frees_on_insert():
    alloc = PageAllocator(8)
    cache = NoPrefixCache(page_size=2, allocator=alloc)
    m = cache.match_prefix([1, 2, 3, 4])
    assert (m.pages, m.num_tokens) == ([], 0)
    cache.lock(m.node)
    pages = alloc.alloc(2)
    assert cache.insert([1, 2, 3, 4], pages) == 0
    cache.unlock(m.node)
    assert alloc.num_free == 8
    assert cache.match_prefix([1, 2, 3, 4]).num_tokens == 0
    assert cache.evict(4) == 0 and cache.flush() is True
    assert cache.stats().cached_tokens == 0 and cache.stats().hit_rate == 0.0


def test_stale_heap_entries_are_compacted():
    cache, alloc = make(page_size=1)
    cache_seq(cache, alloc, [1, 2])
    m = cache.match_prefix([1, 2])
    for _ in range(1000):
        cache.lock(m.node)
        cache.unlock(m.node)  # each unlock re-queues the leaf
    assert len(cache._heap) < 100
    assert cache.evict(2) == 2


def test_pinned_prefix_survives_eviction_until_unpinned():
    cache, alloc = make(page_size=2, num_pages=16)
    system = cache_seq(cache, alloc, [1, 2, 3, 4, 5, 6])
    cache_seq(cache, alloc, [7, 7, 7, 7])
    result = cache.pins.pin([1, 2, 3, 4, 5, 6, 9])  # the trailing partial page is not pinned
    assert (result.ok, result.pinned_tokens) == (True, 6)
    assert cache.pins.pin([1, 2, 3, 4, 5, 6]).pinned_tokens == 6 and len(cache.pins) == 1  # the same pin
    assert cache.evict(100) == 2  # only [7 7 7 7]
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).pages == system
    assert cache.stats().pinned_pages == 3 and cache.protected_pages == 3
    assert not cache.pins.unpin([1, 2, 3, 4])  # no pin was taken with that prefix
    assert cache.pins.unpin([1, 2, 3, 4, 5, 6, 9])
    assert cache.protected_pages == 0 and cache.evict(100) == 3


def test_pins_share_pages_and_are_capped():
    alloc = PageAllocator(16)
    cache = RadixCache(2, alloc, max_pinned_pages=4)
    cache_seq(cache, alloc, [1, 2, 3, 4, 5, 6])
    cache_seq(cache, alloc, [1, 2, 3, 4, 8, 8])
    cache_seq(cache, alloc, [9, 9, 9, 9])
    assert cache.pins.pin([1, 2, 3, 4, 5, 6]).ok
    assert cache.pins.pin([1, 2, 3, 4, 8, 8]).ok  # shares two pages: 4 distinct
    assert cache.stats().pinned_pages == 4
    refused = cache.pins.pin([9, 9, 9, 9])
    assert not refused.ok and "cap" in refused.error and cache.stats().num_pins == 2
    assert not cache.pins.pin([5, 5, 5]).ok  # not cached
    assert not cache.pins.pin([1]).ok  # not a whole page


def test_flush_drops_pins_unless_a_request_holds_a_lock():
    cache, alloc = make(page_size=2)
    cache_seq(cache, alloc, [1, 2, 3, 4])
    cache_seq(cache, alloc, [5, 6])
    cache.pins.pin([1, 2, 3, 4])
    m = cache.match_prefix([5, 6, 7, 8])
    cache.lock(m.node)
    assert cache.flush() is False and len(cache.pins) == 1 and cache.stats().pinned_pages == 2  # restored
    cache.unlock(m.node)
    assert cache.flush() is True and len(cache.pins) == 0 and alloc.num_free == alloc.num_pages


def test_pin_cap_leaves_room_for_the_longest_request():
    assert pin_cap(100, 16, max_context=320) == 20  # a fifth of the pool
    assert pin_cap(100, 16, max_context=1600) == 0  # a full-pool request would never fit beside a pin
    assert pin_cap(100, 16, max_context=1280, max_pinned_tokens=1600) == 19  # 100 - 80 - 1
    assert pin_cap(100, 16, max_context=320, max_pinned_tokens=64) == 4


# -- stateful property test ----------------------------------------------------------------


@dataclass
class SimReq:
    tokens: tuple[int, ...]  # whole pages only
    salt: str | None
    node: object
    prefix: list[int]  # the tree's pages it matched (and locked)
    own: list[int]  # pages it allocated for the rest


# A request's tokens: a cut of one of a few shared "conversations", plus a random tail, so
# prefixes collide often (3 token values, page sizes 1, 2, 4).
TOKENS = st.tuples(st.integers(0, 2), st.integers(0, 12), st.lists(st.integers(0, 2), max_size=4))
SALTS = st.sampled_from([None, None, "s"])
NUM_PAGES = 20


class RadixMachine(RuleBasedStateMachine):
    @initialize(
        page_size=st.sampled_from([1, 2, 4]),
        convs=st.lists(st.lists(st.integers(0, 2), min_size=8, max_size=12), min_size=3, max_size=3),
    )
    def setup(self, page_size, convs):
        self.ps = page_size
        self.convs = convs
        self.alloc = RecordingAllocator(NUM_PAGES)
        self.cache = self.make_cache(page_size)
        self.ref: dict[str | None, dict[tuple[int, ...], int]] = {None: {}, "s": {}}
        self.reqs: list[SimReq] = []

    def make_cache(self, page_size: int) -> RadixCache:
        return RadixCache(page_size, self.alloc)

    def expected_cached(self, tokens, salt) -> int:
        """How many leading pages of tokens the cache should count as cached (any tier)."""
        return len(self.expected(tokens, salt))

    def load_back(self, tokens, salt) -> None:
        """Before a request matches: bring its pages back from a lower tier (none here)."""

    def computed(self, tokens, salt, start: int, own: list[int]) -> None:
        """A request computed pages start.. of tokens into own (the model's part: nothing here)."""

    def expected(self, tokens, salt) -> list[int]:
        ref, pages = self.ref[salt], []
        for end in range(self.ps, len(tokens) - len(tokens) % self.ps + 1, self.ps):
            if tokens[:end] not in ref:
                break
            pages.append(ref[tokens[:end]])
        return pages

    def forget_freed(self) -> list[int]:
        """Drop the pages the tree just gave back from the reference; return them."""
        freed, self.alloc.freed = set(self.alloc.freed), []
        for ref in self.ref.values():
            for prefix in [p for p, page in ref.items() if page in freed]:
                del ref[prefix]
        return sorted(freed)

    @rule(tokens=TOKENS, salt=SALTS, kind=st.sampled_from(["peek", "run", "run", "run"]))
    def start_request(self, tokens, salt, kind):
        """Match, lock, allocate pages for the rest (evicting when short). A quarter of the
        time only peek: a partial trailing page is kept and must not match."""
        conv, cut, tail = tokens
        tokens = self.convs[conv][:cut] + tail
        if kind == "peek":
            m = self.cache.match_prefix(tokens, salt, record=False)
            assert m.pages == self.expected(tuple(tokens), salt)
            assert m.num_tokens == len(m.pages) * self.ps
            # The hash index answers the same question without walking the tree.
            hashes = chain_hashes(tokens, self.ps, salt)
            assert self.cache.cached_pages(hashes) == self.expected_cached(tuple(tokens), salt)
            return
        tokens = tuple(tokens[: len(tokens) - len(tokens) % self.ps])
        assert self.cache.cached_pages(chain_hashes(tokens, self.ps, salt)) == self.expected_cached(tokens, salt)
        self.load_back(tokens, salt)
        m = self.cache.match_prefix(tokens, salt)
        assert m.pages == self.expected(tokens, salt)
        self.cache.lock(m.node)
        need = len(tokens) // self.ps - len(m.pages)
        if need > self.alloc.num_free:
            self.cache.evict(need - self.alloc.num_free)
            freed = self.forget_freed()
            assert not set(freed) & set(m.pages)  # just locked
        own = self.alloc.alloc(need)
        if own is None:
            assert self.cache.evictable_pages == 0  # evict freed all it could
            self.cache.unlock(m.node)
            return
        self.computed(tokens, salt, len(m.pages), own)
        self.reqs.append(SimReq(tokens, salt, m.node, m.pages, own))

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 99), outcome=st.sampled_from(["finish", "finish", "finish", "abort"]))
    def finish_request(self, i, outcome="finish"):
        """Insert, free the duplicates, unlock; a quarter of the time abort (free, unlock)."""
        req = self.reqs.pop(i % len(self.reqs))
        if outcome == "abort":
            self.alloc.free(req.own)
        else:
            pages = req.prefix + req.own
            cached_before = len(self.expected(req.tokens, req.salt))
            already = self.cache.insert(req.tokens, pages, req.salt)
            assert already == cached_before * self.ps >= len(req.prefix) * self.ps
            self.alloc.free(req.own[: cached_before - len(req.prefix)])  # the duplicates
            ref = self.ref[req.salt]
            for j in range(cached_before, len(pages)):
                ref[req.tokens[: (j + 1) * self.ps]] = pages[j]
        self.alloc.freed = []
        self.cache.unlock(req.node)

    @rule(n=st.integers(0, 3))
    def evict(self, n):
        evictable = self.cache.evictable_pages
        freed = self.cache.evict(n)
        assert freed == len(self.forget_freed())
        assert freed >= n if evictable >= n else freed == evictable
        for r in self.reqs:  # a locked request's prefix is still cached, on the same pages
            assert self.expected(r.tokens, r.salt)[: len(r.prefix)] == r.prefix
        assert not {p for r in self.reqs for p in r.prefix} & set(self.alloc._free)

    @rule(action=st.sampled_from(["flush", "finish_all"] + [None] * 10))
    def rarely(self, action):
        """Flush, or finish every request and check no lock is left (rare: both drain state)."""
        if action == "flush":
            anything_locked = any(r.prefix for r in self.reqs)
            assert self.cache.flush() is not anything_locked
            self.forget_freed()
            if not anything_locked:
                assert all(not ref for ref in self.ref.values())
        elif action == "finish_all":
            while self.reqs:
                self.finish_request(0)
            assert all(node.lock_ref == 0 for _, _, node in tree_nodes(self.cache))
            assert self.cache.protected_pages == 0

    @invariant()
    def pages_are_conserved(self):
        in_use = sum(len(r.own) for r in self.reqs)
        cached = self.cache.stats().cached_pages
        assert self.alloc.num_free + in_use + cached == NUM_PAGES
        assert cached == sum(len(ref) for ref in self.ref.values())
        assert self.cache.evictable_pages + self.cache.protected_pages == cached

    @invariant()
    def tree_matches_reference_and_locks(self):
        nodes = tree_nodes(self.cache)
        found: dict[str | None, dict[tuple[int, ...], int]] = {None: {}, "s": {}}
        protected = 0
        for salt, prefix, node in nodes:
            assert len(node.key) == len(node.pages) * self.ps > 0
            start = len(prefix) - len(node.key)
            for j, page in enumerate(node.pages):
                found[salt][prefix[: start + (j + 1) * self.ps]] = page
            want = sum(1 for r in self.reqs if r.salt == salt and r.tokens[: len(prefix)] == prefix
                       and len(r.prefix) * self.ps >= len(prefix))
            assert node.lock_ref == want  # one reference per running request below or at it
            protected += len(node.pages) if node.lock_ref else 0
        assert found == self.ref
        assert protected == self.cache.protected_pages
        assert self.cache.stats().num_nodes == len(nodes)


RadixMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRadixMachine = RadixMachine.TestCase


# -- the same over two tiers -----------------------------------------------------------------

NUM_SLOTS = 12  # fewer than the memory pool: the disk tier evicts too
TINY_KV = SimpleNamespace(num_layers=1, num_kv_heads=1, head_dim=1, kv_bytes_per_token=lambda b: 2 * b)


def kv_value(page_hash: bytes) -> float:
    """The KV a page holds in this test: a number only its own prefix (and salt) gives."""
    return float(int.from_bytes(page_hash[:3], "little"))


class TwoTierMachine(RadixMachine):
    """RadixMachine's rules over a TieredCache with a disk tier smaller than what is ever written,
    plus the disk's own: writes landing, a restart, a corrupt slot. Before a request matches, its
    pages on disk are loaded back. Every page's KV holds kv_value of its prefix's hash, so a page
    that comes back from disk must hold exactly its own prefix's value: never another page's, never
    a corrupt slot's. Invariants across both tiers: memory pages are conserved (free + held by
    requests + cached), disk slots too (free + ready + pending) with no slot both free and used;
    ready disk pages are prefix-closed; locks match the requests; cached_pages counts the union."""

    def make_cache(self, page_size: int) -> TieredCache:
        self.dir = tempfile.mkdtemp(prefix="radixrt-tiers-")
        self.pool = KVPool(TINY_KV, NUM_PAGES, page_size, torch.float32)
        return TieredCache(page_size, self.alloc, self.pool, self.open_tier())

    def open_tier(self) -> DiskTier:
        slot_bytes = 2 * self.ps * 4
        return DiskTier(self.dir, NUM_SLOTS * slot_bytes, {"test": self.ps}, self.pool.page_shape, torch.float32)

    def teardown(self):
        self.cache.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def wait(self, done) -> None:
        deadline = time.monotonic() + 10
        while not done():
            assert time.monotonic() < deadline, "disk I/O did not finish"
            self.cache.poll()
            time.sleep(0.0005)

    def expected_cached(self, tokens, salt) -> int:
        hashes, ref = chain_hashes(tokens, self.ps, salt), self.ref[salt]
        n = 0
        while n < len(hashes) and (tokens[: (n + 1) * self.ps] in ref or self.cache.tier.index.is_ready(hashes[n])):
            n += 1
        return n

    def computed(self, tokens, salt, start, own):
        hashes = chain_hashes(tokens, self.ps, salt)
        for page, h in zip(own, hashes[start:]):
            self.pool.k[0][page].fill_(kv_value(h))
            self.pool.v[0][page].fill_(-kv_value(h))

    def load_back(self, tokens, salt):
        # Writes land in the index only when polled: polling only to the end keeps runs reproducible.
        self.wait(lambda: not self.cache.io_pending)
        hashes = chain_hashes(tokens, self.ps, salt)
        expected = self.expected_cached(tokens, salt)
        job = self.cache.start_load(tokens, salt, hashes, max_pages=NUM_PAGES)
        if job is None:
            return
        self.wait(lambda: job.finished)
        self.forget_freed()  # the load may have evicted memory pages for room
        m = self.cache.match_prefix(tokens, salt, record=False)
        assert len(m.pages) <= expected  # a corrupt page may have cut the run short
        for j, page in enumerate(m.pages):
            assert self.pool.k[0][page].eq(kv_value(hashes[j])).all(), "a page holds another prefix's KV"
            assert self.pool.v[0][page].eq(-kv_value(hashes[j])).all()
            assert self.ref[salt].setdefault(tokens[: (j + 1) * self.ps], page) == page
        self.cache.release_load(job)

    @rule()
    def writes_land(self):
        self.wait(lambda: not self.cache.io_pending)
        assert all(e.ready for e in self.cache.tier.index.entries.values())

    @rule()
    def memory_forgets_everything_it_can(self):
        """So that the next requests find their pages on disk only."""
        self.wait(lambda: not self.cache.io_pending)
        self.cache.evict(NUM_PAGES)
        self.forget_freed()
        assert self.cache.evictable_pages == 0

    @rule(tokens=TOKENS, salt=SALTS)
    def a_session_returns_after_eviction(self, tokens, salt):
        """The tier's reason to be: memory lost the pages, the next request loads them back."""
        self.memory_forgets_everything_it_can()
        self.start_request(tokens, salt, "run")

    @precondition(lambda self: not self.reqs)
    @rule()
    def restart(self):
        """A new process: memory starts empty, the disk tier has every page that was on it."""
        self.wait(lambda: not self.cache.io_pending)
        on_disk = {h for h, e in self.cache.tier.index.entries.items() if e.ready}
        self.cache.close()
        self.alloc = RecordingAllocator(NUM_PAGES)
        self.pool = KVPool(TINY_KV, NUM_PAGES, self.ps, torch.float32)
        self.cache = TieredCache(self.ps, self.alloc, self.pool, self.open_tier())
        self.ref = {None: {}, "s": {}}
        assert set(self.cache.tier.index.entries) == on_disk

    @rule(i=st.integers(0, 99))
    def corrupt_a_slot(self, i):
        self.wait(lambda: not self.cache.io_pending)
        ready = sorted(h for h, e in self.cache.tier.index.entries.items() if e.ready)
        if not ready:
            return
        entry = self.cache.tier.index.entries[ready[i % len(ready)]]
        with open(self.cache.tier.path / "pages.bin", "r+b") as f:
            f.seek(entry.slot * self.cache.tier.slot_bytes)
            f.write(b"\xff" * 4)

    @invariant()
    def disk_slots_are_conserved_and_prefix_closed(self):
        index = self.cache.tier.index
        used = [e.slot for e in index.entries.values()]
        assert len(set(used)) == len(used) and index.num_free + len(used) == NUM_SLOTS
        assert not set(index._free) & set(used) and all(s < index._unused for s in index._free + used)
        children: dict[bytes, int] = {}
        for h, e in index.entries.items():
            if e.parent is not None:
                assert e.parent in index.entries and (index.entries[e.parent].ready or not e.ready)
                children[e.parent] = children.get(e.parent, 0) + 1
            assert e.readers == 0  # every load finished within its rule
        assert all(e.children == children.get(h, 0) for h, e in index.entries.items())
        assert index.num_ready == sum(e.ready for e in index.entries.values())


TwoTierMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestTwoTierMachine = TwoTierMachine.TestCase
