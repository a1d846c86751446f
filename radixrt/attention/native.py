"""The native CPU backend: C++ kernels (csrc/) that attend straight from the KV pages.

One kernel call per layer covers the whole step, decode and prefill requests alike; it reads
each request's keys through its page table, in the CSR form flashinfer also uses::

    page_tables:  r0: [7, 2]   r1: [5]   r2: [9, 4, 1]
    kv_indptr:    [0, 2, 3, 6]            where each request's pages start in kv_indices
    kv_indices:   [7, 2, 5, 9, 4, 1]      only the pages that hold its seq_len keys
    kv_lens:      [seq_len per request]

The index tensors are built once per step in `prepare` and shared by every layer. Each layer's
`LayerAttention` (softmax scale, sliding window, logit soft cap) goes to the kernel as arguments.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from types import ModuleType

import torch

from radixrt.attention.base import AttentionBackend, ForwardBatch, LayerAttention, write_kv
from radixrt.attention.torch_ref import TorchAttention
from radixrt.cache.page_pool import KVPool

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class PagedIndex:
    """A step's page tables as int32 tensors (CSR over pages, as in flashinfer)."""

    qo_indptr: torch.Tensor  # [B + 1] where each request's new tokens start in the token axis
    kv_indptr: torch.Tensor  # [B + 1] where each request's pages start in kv_indices
    kv_indices: torch.Tensor  # [pages] page ids, request after request
    kv_lens: torch.Tensor  # [B] keys per request (cached prefix + new tokens)
    last_page_len: torch.Tensor  # [B] keys in each request's last page, in [1, page_size]


def paged_index(batch: ForwardBatch, device: torch.device | str = "cpu") -> PagedIndex:
    """Build the CSR page index of a step, keeping only the pages its keys occupy."""
    ps = batch.page_size
    num_pages = [-(-n // ps) for n in batch.seq_lens]
    indices = list(itertools.chain.from_iterable(t[:n] for t, n in zip(batch.page_tables, num_pages)))
    kv_indptr = list(itertools.accumulate(num_pages, initial=0))
    last = [n - (p - 1) * ps for n, p in zip(batch.seq_lens, num_pages)]

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return PagedIndex(i32(batch.qo_indptr), i32(kv_indptr), i32(indices), i32(batch.seq_lens), i32(last))


class NativeAttention(AttentionBackend):
    """Paged attention and KV writes in C++; anything the kernels do not cover goes to torch."""

    name = "native"

    def __init__(self, ops: ModuleType, simd: bool = True) -> None:
        self.ops = ops
        self.simd = simd  # False: the kernels' portable loops (for tests on AVX-512 machines)
        self._fallback = TorchAttention()
        self._warned = False

    def prepare(self, batch: ForwardBatch, pool: KVPool) -> None:
        state = batch.backend_state
        k = pool.k[0]
        state["native"] = k.device.type == "cpu" and pool.dtype in SUPPORTED_DTYPES and k.is_contiguous()
        if not state["native"]:
            if not self._warned:
                log.warning("native attention does not cover %s KV on %s; using torch for it", pool.dtype, k.device)
                self._warned = True
            self._fallback.prepare(batch, pool)
            return
        state["index"] = paged_index(batch)

    def forward(self, layer, q, k, v, batch, pool, params: LayerAttention | None = None):
        params = params or LayerAttention.plain(q.shape[-1])
        state = batch.backend_state
        if not state["native"]:
            return self._fallback.forward(layer, q, k, v, batch, pool, params)
        k_cache, v_cache = pool.k[layer], pool.v[layer]
        if k.dtype == pool.dtype and v.dtype == pool.dtype and _rows_contiguous(k) and _rows_contiguous(v):
            self.ops.store_kv(k, v, k_cache, v_cache, batch.out_slots)
        else:
            write_kv(pool, layer, k, v, batch.out_slots)
        dtype = q.dtype
        if dtype != pool.dtype or q.stride(-1) != 1:
            q = q.to(pool.dtype).contiguous()
        out = torch.empty(q.shape, dtype=pool.dtype)
        idx: PagedIndex = state["index"]
        self.ops.paged_attention(
            q, k_cache, v_cache, idx.qo_indptr, idx.kv_indptr, idx.kv_indices, idx.kv_lens, out, params.scale,
            self.simd, window_left=params.window_left, softcap=params.logit_softcap or 0.0,
        )  # fmt: skip
        return out if dtype == pool.dtype else out.to(dtype)


def _rows_contiguous(x: torch.Tensor) -> bool:
    """[T, heads, dim] with each token's heads adjacent in memory (rows may be strided)."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]
