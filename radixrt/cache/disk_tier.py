"""The disk tier: KV pages that outlive memory, and the process.

    DIR/                             --kv-disk-dir
    ├── fingerprints.json            weight-file digests by (path, size, mtime): identity.py
    └── 3f9c0a5e1d2b7c48/            one tier per model identity (identity.py)
        ├── lock                     flock'ed while a process uses this tier
        ├── identity.json            the identity, for people to read
        ├── index.msgpack            identity + every ready page: hash, parent, slot, crc32, age
        └── pages.bin                the slots (page_file.py)

Two background threads do the I/O, one writing and one reading, so a waiting request's read
never queues behind a batch of writes; the step loop only reserves slots, submits and polls.
Writes land in submission order (one writer), so a page's parent is ready before the page.
The index is saved (a temporary file renamed over the old one) once writes have landed and the
writer is idle or PERSIST_INTERVAL_S has passed, and on close (also at interpreter exit). A
crash loses at most what landed since the last save; a slot rewritten after that save fails
its checksum when loaded and is skipped, never used.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch

from radixrt.cache.base import PageHash
from radixrt.cache.disk_index import DiskEntry, DiskIndex, Row
from radixrt.cache.identity import identity_name
from radixrt.cache.page_file import PageFile

log = logging.getLogger(__name__)

PERSIST_INTERVAL_S = 2.0  # while writes keep coming, save the index at least this often
MAX_QUEUED_BYTES = 256 << 20  # past this much data waiting to be written, new pages are not written


class IndexFile(msgspec.Struct):
    identity: dict[str, str | int]
    slot_bytes: int
    rows: list[Row]


@dataclass
class _Write:
    future: Future  # -> the pages' crc32s
    hashes: list[PageHash]
    epoch: int  # a flush starts a new epoch: older writes are ignored when they land
    nbytes: int


@dataclass
class DiskRead:
    future: Future  # -> how many leading pages were whole and matched their checksum
    held: list[tuple[PageHash, DiskEntry]]


class DiskTier:
    def __init__(
        self, directory: str | os.PathLike, capacity_bytes: int, identity: dict, page_shape: Sequence[int],
        dtype: torch.dtype,
    ) -> None:  # fmt: skip
        self.identity = identity
        self.page_shape = tuple(page_shape)
        self.dtype = dtype
        self.slot_bytes = math.prod(self.page_shape) * dtype.itemsize
        num_slots = int(capacity_bytes // self.slot_bytes)
        if num_slots < 1:
            raise ValueError(f"the KV disk tier needs room for one page ({self.slot_bytes} bytes)")
        self.path = Path(directory) / identity_name(identity)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.path / "lock")
        (self.path / "identity.json").write_text(json.dumps(identity, indent=1, sort_keys=True))
        self.index = self._read_index(num_slots)
        self.file = PageFile(self.path / "pages.bin", self.slot_bytes, num_slots)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="radixrt-kv-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="radixrt-kv-read")
        self._writes: deque[_Write] = deque()
        self._queued_bytes = 0
        self._saving: Future | None = None
        self._dirty = False
        self._saved_at = time.monotonic()
        self._epoch = 0
        self.written = self.dropped = self.corrupt = 0
        self._closed = False
        atexit.register(self.close)

    # -- writes --------------------------------------------------------------------------------

    def store(
        self, hashes: Sequence[PageHash], parent: PageHash | None, gather: Callable[[int], torch.Tensor]
    ) -> list[PageHash]:
        """Queue the pages of `hashes` (a run following `parent`, which is on disk or on its way)
        for writing, as many as fit; gather(n) snapshots the first n as a CPU tensor. Returns the
        ready hashes evicted to make room."""
        if self._queued_bytes >= MAX_QUEUED_BYTES:
            self.dropped += len(hashes)
            return []
        slots, evicted = self.index.reserve(hashes, parent)
        self.dropped += len(hashes) - len(slots)
        if slots:
            data = gather(len(slots))
            write = _Write(self._writer.submit(self._write, slots, data), list(hashes[: len(slots)]), self._epoch,
                           len(slots) * self.slot_bytes)  # fmt: skip
            self._writes.append(write)
            self._queued_bytes += write.nbytes
        return evicted

    def _write(self, slots: list[int], data: torch.Tensor) -> list[int]:
        return self.file.write(slots, data.reshape(len(slots), -1).view(torch.uint8).numpy())

    def poll(self) -> list[PageHash]:
        """Apply the writes that landed, in order; return the hashes that became ready."""
        added: list[PageHash] = []
        while self._writes and self._writes[0].future.done():
            write = self._writes.popleft()
            self._queued_bytes -= write.nbytes
            try:
                checksums: Sequence[int | None] = write.future.result()
            except OSError as exc:
                log.warning("KV disk tier: a write failed (%s); those pages stay in memory only", exc)
                checksums = [None] * len(write.hashes)
            if write.epoch != self._epoch:
                continue
            for h, checksum in zip(write.hashes, checksums):
                if checksum is not None and self.index.complete(h, checksum):
                    added.append(h)
                    self.written += 1
                else:
                    self.index.abandon(h)
            self._dirty = True
        self._maybe_save()
        return added

    # -- reads ---------------------------------------------------------------------------------

    def load(self, hashes: Sequence[PageHash], deliver: Callable[[torch.Tensor], None]) -> DiskRead:
        """Read the pages of `hashes` (ready, in prefix order) on the reader thread, which then
        calls deliver(pages) with the leading pages that passed their checksum."""
        held = self.index.start_reading(hashes)
        slots = [e.slot for _, e in held]
        checksums = [e.checksum for _, e in held]
        return DiskRead(self._reader.submit(self._read, slots, checksums, deliver), held)

    def _read(self, slots: list[int], checksums: list[int], deliver: Callable[[torch.Tensor], None]) -> int:
        buf = torch.empty((len(slots), self.slot_bytes), dtype=torch.uint8)
        valid = self.file.read(slots, checksums, buf.numpy())
        if valid:
            deliver(buf[:valid].view(self.dtype).view(valid, *self.page_shape))
        return valid

    def finish_load(self, read: DiskRead) -> tuple[int, list[PageHash]]:
        """Release a finished read. Returns how many pages it delivered and the ready hashes
        dropped because a page failed its checksum (that page and everything below it)."""
        try:
            valid = read.future.result()
        except OSError as exc:
            log.warning("KV disk tier: a read failed (%s)", exc)
            valid = 0
        hashes = [h for h, _ in read.held]
        self.index.stop_reading(read.held)
        self.index.touch(hashes[:valid])
        if valid == len(hashes):
            return valid, []
        self.corrupt += 1
        self._dirty = True
        log.warning("KV disk tier: a page failed its checksum; it and the pages after it are dropped")
        return valid, self.index.drop(hashes[valid])

    # -- lifecycle -----------------------------------------------------------------------------

    def next_done(self) -> list[Future]:
        """The futures whose completion poll() waits for: the oldest write, an index save."""
        futures = [self._writes[0].future] if self._writes else []
        return futures + ([self._saving] if self._saving is not None and not self._saving.done() else [])

    @property
    def pending_writes(self) -> int:
        return len(self._writes)

    @property
    def busy(self) -> bool:
        """Writes in flight, or an index save due or running: keep polling."""
        saving = self._saving is not None and not self._saving.done()
        return bool(self._writes) or self._dirty or saving

    def clear(self) -> list[PageHash]:
        """Forget every page (a flush); return the ready hashes. Nothing may be being read."""
        self._epoch += 1
        self._dirty = True
        return self.index.clear()

    def close(self) -> None:
        """Let the I/O finish, apply it, save the index, release the tier."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        self._dirty = self._dirty or bool(self._writes)
        self._writes, pending = deque(), self._writes
        for write in pending:  # all done now
            if write.epoch == self._epoch and write.future.exception() is None:
                for h, checksum in zip(write.hashes, write.future.result()):
                    if not self.index.complete(h, checksum):
                        self.index.abandon(h)
        if self._dirty:
            self._save(self.index.snapshot())
        self.file.close()
        os.close(self._lock_fd)

    def _maybe_save(self) -> None:
        if not self._dirty or (self._saving is not None and not self._saving.done()):
            return
        if self._writes and time.monotonic() - self._saved_at < PERSIST_INTERVAL_S:
            return
        self._dirty = False
        self._saved_at = time.monotonic()
        self._saving = self._writer.submit(self._save, self.index.snapshot())

    def _save(self, rows: list[Row]) -> None:
        data = msgspec.msgpack.encode(IndexFile(self.identity, self.slot_bytes, rows))
        tmp = self.path / "index.msgpack.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.path / "index.msgpack")

    def _read_index(self, num_slots: int) -> DiskIndex:
        path = self.path / "index.msgpack"
        if not path.exists():
            return DiskIndex(num_slots)
        try:
            saved = msgspec.msgpack.decode(path.read_bytes(), type=IndexFile)
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("KV disk tier: %s is unreadable (%s); starting empty", path, exc)
            return DiskIndex(num_slots)
        if saved.identity != self.identity or saved.slot_bytes != self.slot_bytes:
            log.warning("KV disk tier: %s belongs to another model or KV layout; starting empty", path)
            return DiskIndex(num_slots)
        index = DiskIndex.restore(num_slots, saved.rows)
        log.info("KV disk tier %s: %d pages from an earlier run (%d dropped)", self.path, index.num_ready,
                 len(saved.rows) - index.num_ready)  # fmt: skip
        return index


def _lock(path: Path) -> int:
    """Hold an exclusive flock on path (released when the process exits): one process per tier."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"the KV disk tier {path.parent} is in use by another radixrt process") from None
    return fd
