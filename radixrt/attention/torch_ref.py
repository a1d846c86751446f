"""The reference attention backend in plain torch: runs anywhere torch runs, CPU or GPU.

Decode requests (one new token each) are batched: their keys are gathered from the pages
into one preallocated [B, L_max] buffer and attended with a mask. Prefill chunks run one request
at a time through SDPA with a causal mask offset by the cached prefix (or, with a soft cap, which
SDPA lacks, through explicit matmuls). Masks also apply a layer's sliding window; each distinct
window's masks are built once per step, by the first layer that needs them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from radixrt.attention.base import AttentionBackend, ForwardBatch, LayerAttention, write_kv
from radixrt.cache.page_pool import KVPool


def slot_table(page_tables: list[list[int]], lengths: list[int], page_size: int, device) -> torch.Tensor:
    """[B, max(lengths)] flat slot ids of each request's first `length` tokens (padding: slot 0)."""
    max_pages = max(len(p) for p in page_tables)
    pages = torch.zeros(len(page_tables), max_pages, dtype=torch.int64)
    for row, table in enumerate(page_tables):
        pages[row, : len(table)] = torch.tensor(table, dtype=torch.int64)
    slots = pages[:, :, None] * page_size + torch.arange(page_size)
    return slots.view(len(page_tables), -1)[:, : max(lengths)].to(device)


def attention_mask(query_positions: torch.Tensor, num_keys: int, window: int | None, dtype) -> torch.Tensor:
    """[Q, num_keys] additive mask: 0 where the query at position p sees key j, else -inf.

    It sees j <= p, and with a window only p - j < window. Keys past a decode request's length (the
    gather buffer's padding) lie after its query, so the causal test masks them too.
    """
    keys = torch.arange(num_keys, device=query_positions.device)[None, :]
    queries = query_positions[:, None]
    allowed = keys <= queries
    if window is not None:
        allowed &= keys > queries - window
    return torch.zeros(allowed.shape, dtype=dtype, device=keys.device).masked_fill_(~allowed, float("-inf"))


def soft_cap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    return scores if cap is None else cap * torch.tanh(scores / cap)


class TorchAttention(AttentionBackend):
    name = "torch"

    def __init__(self) -> None:
        self._k_buf = torch.empty(0)
        self._v_buf = torch.empty(0)

    def prepare(self, batch: ForwardBatch, pool: KVPool) -> None:
        qo = batch.qo_indptr
        num_decode = 0
        while num_decode < batch.batch_size and qo[num_decode + 1] - qo[num_decode] == 1:
            num_decode += 1
        state = batch.backend_state
        state["num_decode"] = num_decode
        state["masks"] = {}
        device = pool.k[0].device
        if num_decode:
            lens = batch.seq_lens[:num_decode]
            slots = slot_table(batch.page_tables[:num_decode], lens, batch.page_size, device)
            state["decode_slots"] = slots.reshape(-1)
            state["decode_positions"] = torch.tensor(lens, device=device) - 1
        state["prefills"] = [
            (qo[b], qo[b + 1], batch.prefix_lens[b],
             slot_table([batch.page_tables[b]], [batch.seq_lens[b]], batch.page_size, device)[0])
            for b in range(num_decode, batch.batch_size)
        ]  # fmt: skip

    def forward(self, layer, q, k, v, batch, pool, params: LayerAttention | None = None):
        params = params or LayerAttention.plain(q.shape[-1])
        write_kv(pool, layer, k, v, batch.out_slots)
        state = batch.backend_state
        out = torch.empty_like(q)
        num_decode = state["num_decode"]
        if num_decode:
            out[:num_decode] = self._decode(layer, q[:num_decode], state, pool, params)
        for start, end, prefix, slots in state["prefills"]:
            out[start:end] = self._prefill(layer, q[start:end], prefix, slots, state, pool, params)
        return out

    def _decode(self, layer: int, q: torch.Tensor, state: dict, pool: KVPool, params: LayerAttention) -> torch.Tensor:
        slots = state["decode_slots"]
        batch, heads, dim = q.shape
        kv_heads = pool.k[layer].shape[2]
        length = slots.numel() // batch
        mask = _cached(state, ("decode", params.sliding_window), lambda: attention_mask(
            state["decode_positions"], length, params.sliding_window, torch.float32)[:, None, None, :])  # fmt: skip
        k = self._gather(pool.flat_k(layer), slots, "_k_buf").view(batch, length, kv_heads, dim)
        v = self._gather(pool.flat_v(layer), slots, "_v_buf").view(batch, length, kv_heads, dim)
        qg = q.view(batch, kv_heads, heads // kv_heads, dim)
        # [B, Hkv, G, D] @ [B, Hkv, D, L] -> [B, Hkv, G, L]
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * params.scale
        probs = torch.softmax(soft_cap(scores, params.logit_softcap) + mask, dim=-1).to(q.dtype)
        return torch.matmul(probs, v.permute(0, 2, 1, 3)).reshape(batch, heads, dim)

    def _gather(self, source: torch.Tensor, slots: torch.Tensor, buf_name: str) -> torch.Tensor:
        """index_select into a reused buffer: a fresh multi-MiB tensor per layer costs page faults."""
        buf = getattr(self, buf_name)
        needed = slots.numel() * source.shape[1] * source.shape[2]
        if buf.numel() < needed or buf.dtype != source.dtype or buf.device != source.device:
            buf = torch.empty(needed, dtype=source.dtype, device=source.device)
            setattr(self, buf_name, buf)
        out = buf[:needed].view(slots.numel(), source.shape[1], source.shape[2])
        return torch.index_select(source, 0, slots, out=out)

    @staticmethod
    def _prefill(layer, q, prefix: int, slots, state: dict, pool: KVPool, params: LayerAttention) -> torch.Tensor:
        total, window = slots.numel(), params.sliding_window
        k = pool.flat_k(layer).index_select(0, slots).transpose(0, 1)[None]  # [1, Hkv, L, D]
        v = pool.flat_v(layer).index_select(0, slots).transpose(0, 1)[None]
        qh = q.transpose(0, 1)[None].to(k.dtype)  # [1, H, T, D]
        mask = None
        if prefix or window is not None or params.logit_softcap is not None:
            positions = torch.arange(prefix, total, device=slots.device)
            mask = _cached(state, (prefix, total, window), lambda: attention_mask(positions, total, window, k.dtype))
        if params.logit_softcap is None:
            out = F.scaled_dot_product_attention(
                qh, k, v, attn_mask=mask, is_causal=mask is None, scale=params.scale, enable_gqa=True
            )
        else:  # SDPA has no soft cap
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = torch.matmul(qh, k.transpose(-1, -2)).float() * params.scale
            probs = torch.softmax(soft_cap(scores, params.logit_softcap) + mask, dim=-1).to(v.dtype)
            out = torch.matmul(probs, v)
        return out[0].transpose(0, 1)


def _cached(state: dict, key, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A mask built once per step and shared by every layer with the same window."""
    masks = state["masks"]
    if key not in masks:
        masks[key] = build()
    return masks[key]
