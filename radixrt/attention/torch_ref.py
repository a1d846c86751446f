"""The reference attention backend in plain torch: runs anywhere torch runs, CPU or GPU.

Decode requests (one new token each) are batched: their keys are gathered from the pages
into one preallocated [B, L_max] buffer and attended with a padding mask. Prefill chunks
run one request at a time through SDPA with a causal mask offset by the cached prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixrt.attention.base import AttentionBackend, ForwardBatch, write_kv
from radixrt.cache.page_pool import KVPool


def slot_table(page_tables: list[list[int]], lengths: list[int], page_size: int, device) -> torch.Tensor:
    """[B, max(lengths)] flat slot ids of each request's first `length` tokens (padding: slot 0)."""
    max_pages = max(len(p) for p in page_tables)
    pages = torch.zeros(len(page_tables), max_pages, dtype=torch.int64)
    for row, table in enumerate(page_tables):
        pages[row, : len(table)] = torch.tensor(table, dtype=torch.int64)
    slots = pages[:, :, None] * page_size + torch.arange(page_size)
    return slots.view(len(page_tables), -1)[:, : max(lengths)].to(device)


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
        device = pool.k[0].device
        if num_decode:
            lens = batch.seq_lens[:num_decode]
            slots = slot_table(batch.page_tables[:num_decode], lens, batch.page_size, device)
            valid = torch.arange(slots.shape[1], device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
            mask = torch.zeros(valid.shape, dtype=torch.float32, device=device)
            state["decode_slots"] = slots.reshape(-1)
            state["decode_mask"] = mask.masked_fill_(~valid, float("-inf"))[:, None, None, :]
        prefills = []
        for b in range(num_decode, batch.batch_size):
            start, end = qo[b], qo[b + 1]
            prefix, total = batch.prefix_lens[b], batch.seq_lens[b]
            slots = slot_table([batch.page_tables[b]], [total], batch.page_size, device)[0]
            mask = None
            if prefix:
                q_pos = torch.arange(prefix, total, device=device)[:, None]
                allowed = torch.arange(total, device=device)[None, :] <= q_pos
                mask = torch.zeros(allowed.shape, dtype=pool.dtype, device=device).masked_fill_(~allowed, float("-inf"))
            prefills.append((start, end, slots, mask))
        state["prefills"] = prefills

    def forward(self, layer, q, k, v, batch, pool):
        write_kv(pool, layer, k, v, batch.out_slots)
        state = batch.backend_state
        out = torch.empty_like(q)
        num_decode = state["num_decode"]
        if num_decode:
            out[:num_decode] = self._decode(layer, q[:num_decode], state, pool)
        for start, end, slots, mask in state["prefills"]:
            out[start:end] = self._prefill(layer, q[start:end], slots, mask, pool)
        return out

    def _decode(self, layer: int, q: torch.Tensor, state: dict, pool: KVPool) -> torch.Tensor:
        slots, mask = state["decode_slots"], state["decode_mask"]
        batch, heads, dim = q.shape
        kv_heads = pool.k[layer].shape[2]
        length = slots.numel() // batch
        k = self._gather(pool.flat_k(layer), slots, "_k_buf").view(batch, length, kv_heads, dim)
        v = self._gather(pool.flat_v(layer), slots, "_v_buf").view(batch, length, kv_heads, dim)
        qg = q.view(batch, kv_heads, heads // kv_heads, dim)
        # [B, Hkv, G, D] @ [B, Hkv, D, L] -> [B, Hkv, G, L]
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * dim**-0.5
        probs = torch.softmax(scores + mask, dim=-1).to(q.dtype)
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
    def _prefill(layer, q, slots, mask, pool: KVPool) -> torch.Tensor:
        k = pool.flat_k(layer).index_select(0, slots).transpose(0, 1)[None]
        v = pool.flat_v(layer).index_select(0, slots).transpose(0, 1)[None]
        qh = q.transpose(0, 1)[None].to(k.dtype)
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return out[0].transpose(0, 1)
