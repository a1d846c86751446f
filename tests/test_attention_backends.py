"""Every attention backend computes the same causal attention over the same paged KV.

Each case is a ragged batch: decode requests (one new token over a cached prefix) and prefill
chunks (several new tokens, some over a cached prefix), with pages handed out in shuffled order
so no request's keys are contiguous. The backend under test and the torch reference each get an
identical copy of the pool; both must write the new K/V to the same slots and return the same
output, and both must match a float64 oracle computed from the dense keys. Layers may also have a
sliding window, a logit soft cap and their own softmax scale (`LayerAttention`); the oracle applies
them as transformers does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from radixrt import _native
from radixrt.attention import make_attention_backend
from radixrt.attention.base import ForwardBatch, LayerAttention
from radixrt.attention.native import NativeAttention, paged_index
from radixrt.attention.torch_ref import TorchAttention
from radixrt.cache.page_pool import KVPool
from radixrt.model.config import ModelConfig

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def ops():
    module = _native.load()
    if module is None:
        pytest.skip(f"native kernels unavailable: {_native.load_error()}")
    return module


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


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim", [(4, 4, 64), (9, 3, 64), (8, 2, 128)], ids=["mha", "gqa3", "gqa4"]
)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_native_fp32_parity(ops, batch, page_size, heads, kv_heads, head_dim):
    case = make_case(BATCHES[batch], page_size, heads, kv_heads, head_dim, torch.float32, seed=page_size + heads)
    check_parity(NativeAttention(ops), case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (9, 3), (8, 2)], ids=["mha", "gqa3", "gqa4"])
def test_native_half_parity(ops, dtype, page_size, heads, kv_heads):
    case = make_case(BATCHES["mixed"], page_size, heads, kv_heads, 64, dtype, seed=page_size + heads)
    check_parity(NativeAttention(ops), case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_long_decode_splits_keys(ops, dtype):
    """Few long decode requests: the kernel splits their keys across threads and merges the parts."""
    shapes = [(1500, 1), (700, 1), (257, 1)]
    check_parity(NativeAttention(ops), make_case(shapes, 16, 9, 3, 64, dtype, seed=3))


@pytest.mark.parametrize("head_dim", [40, 64], ids=["d40-portable", "d64-portable"])
def test_native_portable_path(ops, head_dim):
    """The plain-loop path other CPUs take (and head dims that are not a multiple of 16)."""
    case = make_case(BATCHES["mixed"], 4, 6, 2, head_dim, torch.float32, seed=head_dim)
    check_parity(NativeAttention(ops, simd=False), case)
    if head_dim == 40:
        check_parity(NativeAttention(ops), case)  # the vector path hands odd head dims to the loops itself


@pytest.mark.parametrize("seed", range(8))
def test_native_random_ragged_batches(ops, seed):
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 8, 16, 64])
    kv_heads = rng.choice([1, 2, 3])
    heads = kv_heads * rng.choice([1, 3, 4])
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
    decode = [(rng.randrange(0, 300), 1) for _ in range(rng.randrange(0, 6))]
    prefill = [(rng.choice([0, rng.randrange(0, 200)]), rng.randrange(1, 70)) for _ in range(rng.randrange(0, 4))]
    case = make_case(decode + prefill or [(0, 3)], page_size, heads, kv_heads, 64, dtype, seed)
    check_parity(NativeAttention(ops), case)


# Sliding windows from one key (the query alone) to wider than any request; soft caps; other scales.
LAYERS = {
    "window1": LayerAttention(scale=0.125, sliding_window=1),
    "window5": LayerAttention(scale=0.125, sliding_window=5),
    "window16-scale": LayerAttention(scale=0.3, sliding_window=16),
    "window40-softcap": LayerAttention(scale=0.2, sliding_window=40, logit_softcap=2.0),
    "softcap": LayerAttention(scale=0.125, logit_softcap=1.5),
    "window-wider-than-all": LayerAttention(scale=0.125, sliding_window=4096),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("batch", list(BATCHES))
def test_native_window_softcap_scale(ops, batch, layer, dtype):
    case = make_case(BATCHES[batch], 4, 9, 3, 64, dtype, seed=len(layer))
    check_parity(NativeAttention(ops), case, LAYERS[layer])


@pytest.mark.parametrize("layer", ["window5", "window40-softcap", "softcap"])
def test_native_window_softcap_portable_path(ops, layer):
    case = make_case(BATCHES["mixed"], 4, 6, 2, 40, torch.float32, seed=7)
    check_parity(NativeAttention(ops, simd=False), case, LAYERS[layer])
    check_parity(NativeAttention(ops), case, LAYERS[layer])


def test_native_long_decode_splits_only_the_window(ops):
    """A window shorter than a long request's keys: the split-KV decode covers the window alone."""
    case = make_case([(1500, 1), (700, 1), (257, 1), (40, 1)], 16, 9, 3, 64, torch.float32, seed=4)
    check_parity(NativeAttention(ops), case, LAYERS["window40-softcap"])
    check_parity(NativeAttention(ops), case, LayerAttention(scale=0.125, sliding_window=600))


def test_the_window_and_cap_change_the_output():
    """So the parity tests above would catch a backend that ignored them."""
    case = make_case(BATCHES["mixed"], 4, 9, 3, 64, torch.float32)
    for name in ("window5", "softcap"):
        plain, _, _ = run_backend(TorchAttention(), case, params=LayerAttention(scale=LAYERS[name].scale))
        changed, _, _ = run_backend(TorchAttention(), case, params=LAYERS[name])
        assert rel_err(changed, plain) > 0.05, name


def test_paged_index_keeps_only_occupied_pages():
    case = make_case([(15, 1), (0, 17), (3, 1)], 16, 2, 1, 16, torch.float32, seed=5)
    idx = paged_index(case.batch)
    tables = case.batch.page_tables
    assert idx.kv_indptr.tolist() == [0, 1, 3, 4]
    assert idx.kv_indices.tolist() == tables[0][:1] + tables[1][:2] + tables[2][:1]
    assert idx.kv_lens.tolist() == [16, 17, 4] and idx.last_page_len.tolist() == [16, 1, 4]
    assert idx.qo_indptr.tolist() == [0, 1, 18, 19]


def test_auto_picks_native_on_cpu(ops):
    backend = make_attention_backend("auto", "cpu")
    assert isinstance(backend, NativeAttention)
    assert isinstance(make_attention_backend("torch", "cpu"), TorchAttention)
    assert isinstance(make_attention_backend("native", "cpu"), NativeAttention)


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setenv("RADIXRT_NATIVE", "0")
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_error", None)
    with pytest.warns(RuntimeWarning, match="native CPU kernels are unavailable") as caught:
        first = make_attention_backend("auto", "cpu")
        second = make_attention_backend("auto", "cpu")
    assert isinstance(first, TorchAttention) and isinstance(second, TorchAttention)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    with pytest.raises(RuntimeError, match="RADIXRT_NATIVE=0"):
        make_attention_backend("native", "cpu")


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="flashinfer"):
        make_attention_backend("flashinfer", "cpu")
    with pytest.raises(ValueError, match="bogus"):
        make_attention_backend("bogus", "cpu")
