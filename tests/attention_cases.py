"""Ragged paged-attention cases and the parity check every attention backend test uses.

Each case is a ragged batch: decode requests (one new token over a cached prefix) and prefill
chunks (several new tokens, some over a cached prefix), with pages handed out in shuffled order
so no request's keys are contiguous. `check_parity` gives the backend under test and the torch
reference identical copies of the pool; both must write the new K/V to the same slots and return
the same output, and both must match a float64 oracle computed from the dense keys.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from radixrt.attention.base import ForwardBatch, LayerAttention
from radixrt.attention.torch_ref import TorchAttention
from radixrt.cache.page_pool import KVPool
from radixrt.model.config import ModelConfig

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def model_config(num_heads: int, num_kv_heads: int, head_dim: int) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=8, hidden_size=num_heads * head_dim, intermediate_size=8,
        num_layers=2, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rms_norm_eps=1e-5,
        rope_theta=1e4, max_position_embeddings=4096, tie_word_embeddings=False, attention_bias=False,
    )  # fmt: skip


@dataclass
class Case:
    pool: KVPool
    batch: ForwardBatch
    q: torch.Tensor  # [T, H, D]
    k: torch.Tensor  # [T, Hkv, D] the step's new keys
    v: torch.Tensor


def make_case(shapes, page_size, heads, kv_heads, head_dim, dtype, seed=0, device="cpu") -> Case:
    """shapes: (cached prefix, new tokens) per request; pages are shuffled across requests."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    need = [-(-(p + n) // page_size) + rng.randrange(2) for p, n in shapes]  # some tables run a page long
    pool = KVPool(model_config(heads, kv_heads, head_dim), sum(need) + 3, page_size, dtype, device)
    for t in pool.k + pool.v:
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
    free = list(range(pool.num_pages))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in need]
    qo, slots, positions = [0], [], []
    for (prefix, new), table in zip(shapes, tables):
        qo.append(qo[-1] + new)
        positions += range(prefix, prefix + new)
        slots += [table[i // page_size] * page_size + i % page_size for i in range(prefix, prefix + new)]
    T = qo[-1]
    batch = ForwardBatch(
        input_ids=torch.zeros(T, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, device=device),
        out_slots=torch.tensor(slots, dtype=torch.int64, device=device),
        qo_indptr=qo,
        prefix_lens=[p for p, _ in shapes],
        seq_lens=[p + n for p, n in shapes],
        page_tables=tables,
        logits_indices=torch.tensor([e - 1 for e in qo[1:]], device=device),
        page_size=page_size,
    )
    q, k, v = (torch.randn(T, h, head_dim, generator=gen).to(dtype).to(device) for h in (heads, kv_heads, kv_heads))
    return Case(pool, batch, q, k, v)


def run_backend(backend, case: Case, layer: int = 1, params: LayerAttention | None = None):
    """Run one layer on a private copy of the pool; return (output, the layer's K and V pages)."""
    pool = KVPool.__new__(KVPool)
    pool.__dict__.update(case.pool.__dict__)
    pool.k = [t.clone() for t in case.pool.k]
    pool.v = [t.clone() for t in case.pool.v]
    batch = ForwardBatch(**{**case.batch.__dict__, "backend_state": {}})
    backend.prepare(batch, pool)
    out = backend.forward(layer, case.q, case.k, case.v, batch, pool, params)
    return out, pool.k[layer], pool.v[layer]


def oracle(case: Case, k_pages: torch.Tensor, v_pages: torch.Tensor, params: LayerAttention) -> torch.Tensor:
    """Dense float64 causal attention, request by request, from keys read through the page table.

    As transformers' eager attention: scores = q.k * scale, soft-capped, then a query at position p
    sees keys j <= p with p - j < sliding_window.
    """
    b = case.batch
    flat_k = k_pages.reshape(-1, *k_pages.shape[2:]).cpu().double()
    flat_v = v_pages.reshape(-1, *v_pages.shape[2:]).cpu().double()
    heads, kv_heads = case.q.shape[1], flat_k.shape[1]
    out = torch.empty(case.q.shape, dtype=torch.float64)
    for r in range(b.batch_size):
        lo, hi, total = b.qo_indptr[r], b.qo_indptr[r + 1], b.seq_lens[r]
        slots = [b.page_tables[r][i // b.page_size] * b.page_size + i % b.page_size for i in range(total)]
        keys = flat_k[slots].repeat_interleave(heads // kv_heads, dim=1)  # [L, H, D]
        values = flat_v[slots].repeat_interleave(heads // kv_heads, dim=1)
        q = case.q[lo:hi].cpu().double()
        scores = torch.einsum("thd,lhd->htl", q, keys) * params.scale
        if params.logit_softcap is not None:
            scores = params.logit_softcap * torch.tanh(scores / params.logit_softcap)
        query_pos = (b.prefix_lens[r] + torch.arange(hi - lo))[:, None]
        visible = torch.arange(total)[None, :] <= query_pos
        if params.sliding_window is not None:
            visible &= torch.arange(total)[None, :] > query_pos - params.sliding_window
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[lo:hi] = torch.einsum("htl,lhd->thd", probs, values)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.cpu().double(), b.cpu().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def check_parity(backend, case: Case, params: LayerAttention | None = None):
    ref_out, ref_k, ref_v = run_backend(TorchAttention(), case, params=params)
    out, k_pages, v_pages = run_backend(backend, case, params=params)
    assert torch.equal(k_pages, ref_k) and torch.equal(v_pages, ref_v), "new K/V landed in different slots"
    tol = TOLERANCE[case.q.dtype]
    exact = oracle(case, ref_k, ref_v, params or LayerAttention.plain(case.q.shape[-1]))
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    assert rel_err(out, ref_out) <= tol
    assert rel_err(out, exact) <= tol
    assert rel_err(ref_out, exact) <= tol


# (prefix, new) per request: decode first (as the scheduler orders them), then prefill chunks.
BATCHES = {
    "decode-edges": [(0, 1), (15, 1), (16, 1), (31, 1), (32, 1), (100, 1)],
    "prefill-edges": [(0, 1), (0, 16), (16, 16), (5, 40), (31, 2), (64, 17)],
    "mixed": [(9, 1), (47, 1), (0, 1), (0, 23), (32, 9), (17, 40)],
}


LAYERS = {
    "window1": LayerAttention(scale=0.125, sliding_window=1),
    "window5": LayerAttention(scale=0.125, sliding_window=5),
    "window16-scale": LayerAttention(scale=0.3, sliding_window=16),
    "window40-softcap": LayerAttention(scale=0.2, sliding_window=40, logit_softcap=2.0),
    "softcap": LayerAttention(scale=0.125, logit_softcap=1.5),
    "window-wider-than-all": LayerAttention(scale=0.125, sliding_window=4096),
}


