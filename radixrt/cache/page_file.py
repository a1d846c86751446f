"""The disk tier's page file: one KV page per fixed-size slot of one sparse file.

    pages.bin
    +--------------+--------------+-----+----------------------+
    | slot 0       | slot 1       | ... | slot num_slots - 1   |
    +--------------+--------------+-----+----------------------+
    slot s = bytes [s * slot_bytes, (s + 1) * slot_bytes): one page as KVPool.read_pages lays it
    out, [layers, 2 (K, V), page_size, kv_heads, head_dim] in the KV dtype

The file is sized once (ftruncate: sparse, so disk blocks are only used as slots are written).
Reads and writes are positional (os.preadv / os.pwritev: no shared file offset, so the reader
and the writer thread need no lock, and the GIL is released while the kernel copies), one
system call per run of consecutive slots. Every page's crc32 (zlib: about 4 GB/s on our CPU,
also without the GIL) is returned by `write` and checked by `read`, so a torn, truncated or
overwritten slot is never loaded.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_IOVECS = 512  # buffers per preadv/pwritev call (Linux allows 1024)


class PageFile:
    def __init__(self, path: Path, slot_bytes: int, num_slots: int) -> None:
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._fd, slot_bytes * num_slots)

    def write(self, slots: Sequence[int], pages: np.ndarray) -> list[int]:
        """Write pages ([len(slots), slot_bytes] uint8) into slots; return each page's crc32."""
        for start, end in _runs(slots):
            buffers = [pages[i] for i in range(start, end)]
            written = os.pwritev(self._fd, buffers, slots[start] * self.slot_bytes)
            if written != (end - start) * self.slot_bytes:
                raise OSError(f"short write to the KV page file ({written} bytes)")
        return [zlib.crc32(page) for page in pages]

    def read(self, slots: Sequence[int], checksums: Sequence[int], out: np.ndarray) -> int:
        """Read slots into out ([len(slots), slot_bytes] uint8); return how many leading pages are
        whole and match their checksum (the rest of a prefix is useless once one page is bad)."""
        for start, end in _runs(slots):
            got = os.preadv(self._fd, [out[i] for i in range(start, end)], slots[start] * self.slot_bytes)
            whole = start + got // self.slot_bytes
            for i in range(start, end):
                if i >= whole or zlib.crc32(out[i]) != checksums[i]:
                    return i
        return len(slots)

    def close(self) -> None:
        os.close(self._fd)


def _runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) index ranges of slots consecutive on disk, at most MAX_IOVECS long."""
    runs, start = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1 or i - start == MAX_IOVECS:
            runs.append((start, i))
            start = i
    return runs
