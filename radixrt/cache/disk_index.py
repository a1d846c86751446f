"""The disk tier's index: which page lives in which slot, and which pages to evict first.

Pages on disk form a trie by chain hash (base.chain_hashes): each entry knows its parent (the
page before it in its sequence; None for a sequence's first page under its salt) and how many
children it has. Like the radix tree in memory, the set of ready pages is prefix-closed, which
matching and the waiting queue rely on: a page is queued for writing only after its parent,
writes land in order, and eviction takes leaves only, least recently used first::

    h0 ── h1 ── h2 ── h3          ready: h0..h3, h5     pending: h4 (its slot is reserved,
           └─── h4 ── h5?                                its write has not landed yet)

An entry is *pending* from the moment its slot is reserved until its write lands. A pending
entry counts as a child (its parent stays) but never matches; a page whose parent is gone by
the time it lands is dropped. Entries being read (`readers`) are never evicted.

`snapshot()` lists the ready entries for the index file, and `restore()` rebuilds an index from
such a list, keeping only what is consistent (slots in range and used once, parents present).
Only the step loop's thread touches an index.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence

from radixrt.cache.base import PageHash, cached_run

Row = tuple[bytes, bytes, int, int, int]  # hash, parent (b"" for a first page), slot, crc32, last access


class DiskEntry:
    __slots__ = ("slot", "checksum", "parent", "children", "access", "readers", "ready")

    def __init__(self, slot: int, parent: PageHash | None, access: int) -> None:
        self.slot = slot
        self.checksum = 0
        self.parent = parent
        self.children = 0  # entries (ready or pending) whose parent this is
        self.access = access
        self.readers = 0
        self.ready = False


class DiskIndex:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.entries: dict[PageHash, DiskEntry] = {}
        self._free: list[int] = []  # slots given back
        self._unused = 0  # slots from here on were never handed out (a big tier need not list them)
        self._heap: list[tuple[int, int, PageHash]] = []  # eviction candidates, checked when popped
        self._seq = itertools.count()
        self._clock = 0
        self.num_ready = 0

    # -- queries ---------------------------------------------------------------------------------

    def is_ready(self, h: PageHash) -> bool:
        entry = self.entries.get(h)
        return entry is not None and entry.ready

    def ready_run(self, hashes: Sequence[PageHash], start: int = 0) -> int:
        """How many of hashes[start:] are ready, in a row."""
        n = start
        while n < len(hashes) and self.is_ready(hashes[n]):
            n += 1
        return n - start

    def known_prefix(self, hashes: Sequence[PageHash]) -> int:
        """How many leading hashes are on disk or on their way (prefix-closed)."""
        return cached_run(hashes, self.entries.__contains__)

    @property
    def num_free(self) -> int:
        return len(self._free) + self.num_slots - self._unused

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        if self._unused < self.num_slots:
            self._unused += 1
            return self._unused - 1
        return None

    # -- writes ----------------------------------------------------------------------------------

    def reserve(self, hashes: Sequence[PageHash], parent: PageHash | None) -> tuple[list[int], list[PageHash]]:
        """Pending entries with a slot each for hashes (a run following `parent`), evicting LRU
        leaves for room. Returns the slots (fewer than hashes when the rest cannot fit) and the
        ready hashes evicted."""
        slots: list[int] = []
        evicted: list[PageHash] = []
        self._clock += 1
        for h in hashes:
            self._adopt(parent)  # before evicting: the parent must not go to make room for its child
            slot = self._take_slot()
            while slot is None:
                gone = self._evict_one()
                if gone is None:
                    self._orphan(parent)
                    return slots, evicted
                evicted.append(gone)
                slot = self._take_slot()
            entry = DiskEntry(slot, parent, self._clock)
            self.entries[h] = entry
            slots.append(entry.slot)
            parent = h
        return slots, evicted

    def complete(self, h: PageHash, checksum: int) -> bool:
        """A write landed: the pending entry becomes ready (True), unless it or its parent is gone."""
        entry = self.entries.get(h)
        if entry is None or entry.ready:
            return False  # dropped meanwhile (a flush, a corrupt ancestor)
        parent = self.entries.get(entry.parent) if entry.parent is not None else None
        if entry.parent is not None and (parent is None or not parent.ready):
            self.abandon(h)
            return False
        entry.ready = True
        entry.checksum = checksum
        self.num_ready += 1
        self._push(h, entry)
        return True

    def abandon(self, h: PageHash) -> None:
        """A pending write failed or came too late: free its slot."""
        entry = self.entries.get(h)
        if entry is None or entry.ready:
            return
        del self.entries[h]
        self._free.append(entry.slot)
        self._orphan(entry.parent)

    # -- reads -----------------------------------------------------------------------------------

    def touch(self, hashes: Iterable[PageHash]) -> None:
        self._clock += 1
        for h in hashes:
            entry = self.entries.get(h)
            if entry is not None:
                entry.access = self._clock

    def start_reading(self, hashes: Sequence[PageHash]) -> list[tuple[PageHash, DiskEntry]]:
        """Keep these entries (and their slots) from eviction until `stop_reading`."""
        held = [(h, self.entries[h]) for h in hashes]
        for _, entry in held:
            entry.readers += 1
        return held

    def stop_reading(self, held: list[tuple[PageHash, DiskEntry]]) -> None:
        for h, entry in held:
            entry.readers -= 1
            if entry.readers:
                continue
            if self.entries.get(h) is entry:
                self._push(h, entry)
            else:  # dropped while it was read: its slot was kept for the reader until now
                self._free.append(entry.slot)

    def drop(self, h: PageHash) -> list[PageHash]:
        """Remove a (corrupt) entry and everything below it; return the ready hashes removed.
        A scan of the index, but corruption is rare."""
        top = self.entries.get(h)
        if top is None:
            return []
        doomed, frontier = [], {h}
        while frontier:
            doomed += frontier
            frontier = {k for k, e in self.entries.items() if e.parent in frontier}
        removed = []
        for k in doomed:
            entry = self.entries.pop(k)
            if entry.ready:
                self.num_ready -= 1
                removed.append(k)
            if not entry.readers:  # else stop_reading frees it
                self._free.append(entry.slot)
        self._orphan(top.parent)
        return removed

    def clear(self) -> list[PageHash]:
        """Forget every entry (a flush; nothing may be being read); return the ready hashes. In-flight
        writes land on free slots and are ignored (complete() finds no entry); the single writer
        keeps them in order, so a slot written again later ends up with the later page."""
        if any(e.readers for e in self.entries.values()):
            raise RuntimeError("clear() while pages are being read")
        removed = [h for h, e in self.entries.items() if e.ready]
        self.entries.clear()
        self._free, self._unused = [], 0
        self._heap.clear()
        self.num_ready = 0
        return removed

    # -- persistence -----------------------------------------------------------------------------

    def snapshot(self) -> list[Row]:
        return [(h, e.parent or b"", e.slot, e.checksum, e.access) for h, e in self.entries.items() if e.ready]

    @classmethod
    def restore(cls, num_slots: int, rows: Iterable[Row]) -> DiskIndex:
        """An index of the consistent part of rows: slots in range and used once, every parent present."""
        index = cls(num_slots)
        by_hash: dict[bytes, Row] = {}
        taken: set[int] = set()
        for row in rows:
            h, _, slot, _, _ = row
            if len(h) == 16 and 0 <= slot < num_slots and slot not in taken and h not in by_hash:
                by_hash[h] = row
                taken.add(slot)
        valid: dict[bytes, bool] = {b"": True}  # b"": no parent
        for h in by_hash:
            chain: dict[bytes, None] = {}
            while h not in valid and h in by_hash and h not in chain:  # up the parents to a known verdict
                chain[h] = None
                h = by_hash[h][1]
            verdict = valid.get(h, False)  # a missing parent or a cycle: invalid
            valid.update(dict.fromkeys(chain, verdict))
        for h, (_, parent, slot, checksum, access) in by_hash.items():
            if valid[h]:
                entry = DiskEntry(slot, parent or None, access)
                entry.checksum, entry.ready = checksum, True
                index.entries[h] = entry
                index._clock = max(index._clock, access)
        for entry in index.entries.values():
            if entry.parent is not None:
                index.entries[entry.parent].children += 1
        used = {e.slot for e in index.entries.values()}
        index._unused = max(used, default=-1) + 1
        index._free = [s for s in range(index._unused) if s not in used]
        index.num_ready = len(index.entries)
        for h, entry in index.entries.items():
            index._push(h, entry)
        return index

    # -- internals -------------------------------------------------------------------------------

    def _adopt(self, parent: PageHash | None) -> None:
        if parent is not None:
            self.entries[parent].children += 1

    def _orphan(self, parent: PageHash | None) -> None:
        """One child of parent is gone; a parent left childless becomes an eviction candidate."""
        entry = self.entries.get(parent) if parent is not None else None
        if entry is not None:
            entry.children -= 1
            self._push(parent, entry)

    def _push(self, h: PageHash, entry: DiskEntry) -> None:
        if not entry.ready or entry.children or entry.readers:
            return
        if len(self._heap) > 2 * len(self.entries) + 64:  # mostly stale: rebuild
            self._heap = [(e.access, next(self._seq), k) for k, e in self.entries.items()
                          if e.ready and not e.children and not e.readers]  # fmt: skip
            heapq.heapify(self._heap)
            return
        heapq.heappush(self._heap, (entry.access, next(self._seq), h))

    def _evict_one(self) -> PageHash | None:
        while self._heap:
            access, _, h = heapq.heappop(self._heap)
            entry = self.entries.get(h)
            if entry is None or not entry.ready or entry.children or entry.readers:
                continue  # gone, not a leaf, or being read: not a candidate now
            if access != entry.access:
                self._push(h, entry)  # touched since it was queued: requeue at its real age
                continue
            del self.entries[h]
            self._free.append(entry.slot)
            self.num_ready -= 1
            self._orphan(entry.parent)
            return h
        return None
