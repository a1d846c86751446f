"""The KV page pool: every layer's K and V live in fixed-size pages from one budget.

Memory layout (per layer, "NHD" as flashinfer calls it)::

    k[layer]: [num_pages, page_size, num_kv_heads, head_dim]
               page 0          page 1                    page P-1
              +-----------+  +-----------+            +-----------+
              | t0 .. t15 |  | t0 .. t15 |    ...     | t0 .. t15 |
              +-----------+  +-----------+            +-----------+

A request owns a list of page ids (its page table). Token i of the request lives in page
`page_table[i // page_size]` at offset `i % page_size`, i.e. at flat slot
`page_table[i // page_size] * page_size + i % page_size` of `k[layer].view(-1, H, D)`.
Page ids are handed out by a `PageAllocator`, which the scheduler's side owns: a
tensor-parallel rank holds a `KVPool` for its share of the heads and no allocator.
Nothing is reserved up front.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch


class KVLayout(Protocol):
    """What the pool needs to know of a model (a `ModelConfig` is one)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def kv_bytes_per_token(self, dtype_bytes: int) -> int: ...


class PageAllocator:
    """A free list of page ids. Freeing a page twice is a bug and raises."""

    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"the KV pool needs at least one page (got {num_pages})")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._is_free = bytearray(b"\x01") * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """Take n pages, or None (taking nothing) when fewer than n are free."""
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._is_free[p] = 0
        return pages

    def free(self, pages: Iterable[int]) -> None:
        for p in pages:
            if self._is_free[p]:
                raise RuntimeError(f"page {p} freed twice")
            self._is_free[p] = 1
            self._free.append(p)


class KVPool:
    """Per-layer K/V page storage."""

    def __init__(
        self,
        config: KVLayout,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.page_size = page_size
        self.num_pages = num_pages
        self.dtype = dtype
        shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @staticmethod
    def pages_for_budget(config: KVLayout, memory_bytes: int, page_size: int, dtype: torch.dtype) -> int:
        """How many pages fit in `memory_bytes` of K+V storage."""
        per_page = config.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * page_size
        return max(1, memory_bytes // per_page)

    def flat_k(self, layer: int) -> torch.Tensor:
        """Layer K as [num_pages * page_size, kv_heads, head_dim]: one row per slot."""
        return self.k[layer].view(-1, *self.k[layer].shape[2:])

    def flat_v(self, layer: int) -> torch.Tensor:
        return self.v[layer].view(-1, *self.v[layer].shape[2:])

    @property
    def page_shape(self) -> tuple[int, ...]:
        """One page of every layer's K and V as `read_pages` returns it: [layers, 2 (K, V), page_size, heads, dim]."""
        return (len(self.k), 2, *self.k[0].shape[1:])

    def read_pages(self, pages: Sequence[int]) -> torch.Tensor:
        """A copy of these pages' K and V, one contiguous [len(pages), *page_shape] tensor on the
        CPU: page-major, so each page is one run of bytes (one slot of the disk tier). Gathered
        layer-major into contiguous rows first, then transposed once: copying straight into the
        strided page-major rows is many times slower on CPU."""
        index = torch.tensor(list(pages), dtype=torch.long, device=self.k[0].device)
        rows = torch.empty((len(self.k), 2, len(index), *self.k[0].shape[1:]), dtype=self.dtype, device=index.device)
        for layer, (k, v) in enumerate(zip(self.k, self.v)):
            torch.index_select(k, 0, index, out=rows[layer, 0])
            torch.index_select(v, 0, index, out=rows[layer, 1])
        return rows.permute(2, 0, 1, 3, 4, 5).contiguous().cpu()

    def write_pages(self, pages: Sequence[int], data: torch.Tensor) -> None:
        """Store `data` ([len(pages), *page_shape], as read_pages returns it) into these pages."""
        index = torch.tensor(list(pages), dtype=torch.long, device=self.k[0].device)
        rows = data.to(index.device).permute(1, 2, 0, 3, 4, 5).contiguous()  # layer-major, as in the pool
        for layer, (k, v) in enumerate(zip(self.k, self.v)):
            k.index_copy_(0, index, rows[layer, 0])
            v.index_copy_(0, index, rows[layer, 1])
