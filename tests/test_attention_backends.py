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

import pytest
import torch
from attention_cases import BATCHES, LAYERS, check_parity, make_case, rel_err, run_backend
from hypothesis import example, given, settings
from hypothesis import strategies as st

from radixrt import _native
from radixrt.attention import make_attention_backend
from radixrt.attention.base import LayerAttention
from radixrt.attention.native import NativeAttention, paged_index
from radixrt.attention.torch_ref import TorchAttention


@pytest.fixture(scope="module")
def ops():
    module = _native.load()
    if module is None:
        pytest.skip(f"native kernels unavailable: {_native.load_error()}")
    return module


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


def _attend(ops, q, k_cache, v_cache, requests, page_size, window_left=-1, simd=True):
    """ops.paged_attention over requests given as (pages, keys, new tokens); q holds their new tokens' rows."""
    qo, kv, indices = [0], [0], []
    for pages, keys, new in requests:
        used = pages[: -(-keys // page_size)]
        qo.append(qo[-1] + new), kv.append(kv[-1] + len(used)), indices.extend(used)
    out = torch.empty_like(q)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    ops.paged_attention(q, k_cache, v_cache, i32(qo), i32(kv), i32(indices), i32([k for _, k, _ in requests]), out,
                        0.125, simd, window_left, 0.0)  # fmt: skip
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 1100), st.integers(2, 9), st.integers(0, 4), st.sampled_from([-1, 200]),
       st.sampled_from([torch.float32, torch.bfloat16]), st.booleans(), st.integers(0, 99))  # fmt: skip
@example(508, 9, 0, -1, torch.bfloat16, True, 0)  # verify rows on both sides of the split size change (512 keys)
@example(300, 2, 4, -1, torch.bfloat16, True, 1)  # a batch that runs several splits per task, in two tasks
@example(1000, 3, 4, 200, torch.float32, True, 2)  # long splits, several per task, a sliding window
def test_native_query_result_depends_on_its_keys_alone(ops, prefix, new, others, window_left, dtype, simd, seed):
    """A query's output is the same to the bit whether it is a decode query alone, one of several new
    tokens (a speculative verify step), batched with other requests (whose splits change how a request's
    splits are grouped into tasks), or run on one thread, on the vector path and the portable one: what
    lets speculation and --enable-deterministic-inference promise outputs equal to plain decoding."""
    gen = torch.Generator().manual_seed(seed)
    page_size, heads, kv_heads, D = 16, 9, 3, 64
    pages_per_request = -(-(prefix + new) // page_size)
    num_pages = pages_per_request * (others + 1)
    k_cache, v_cache = (torch.randn(num_pages, page_size, kv_heads, D, generator=gen).to(dtype) for _ in range(2))
    order = torch.randperm(num_pages, generator=gen).tolist()
    tables = [order[i * pages_per_request : (i + 1) * pages_per_request] for i in range(others + 1)]
    q = torch.randn(new, heads, D, generator=gen).to(dtype)
    verify = _attend(ops, q, k_cache, v_cache, [(tables[0], prefix + new, new)], page_size, window_left, simd)
    threads = torch.get_num_threads()
    for i in range(new):  # each new token as a decode query, among `others` decoding requests
        rows = torch.cat([q[i : i + 1], torch.randn(others, heads, D, generator=gen).to(dtype)])
        batch = [(tables[0], prefix + i + 1, 1)] + [(t, max(1, prefix + new - j), 1) for j, t in enumerate(tables[1:])]
        assert torch.equal(_attend(ops, rows, k_cache, v_cache, batch, page_size, window_left, simd)[0], verify[i])
    try:
        torch.set_num_threads(1)
        alone = _attend(ops, q[-1:], k_cache, v_cache, [(tables[0], prefix + new, 1)], page_size, window_left, simd)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone[0], verify[-1])


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
