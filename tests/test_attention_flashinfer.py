"""The flashinfer backend: its glue on any machine, its kernels where there is a GPU.

Without CUDA (CI, our CPU machines) the backend runs against a stand-in `flashinfer` module that
implements the documented semantics of the two wrappers it plans (paged KV in CSR form with
`last_page_len`, NHD pages, the causal mask aligned to the end of each request's keys, `sm_scale`,
the inclusive `window_left`, `logits_soft_cap` as cap * tanh(sm_scale * q.k / cap)), written
independently of our page-index code; that checks what we hand flashinfer and which wrapper we
pick. The `gpu` tests run the real library and skip cleanly without CUDA or flashinfer.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from attention_cases import BATCHES, LAYERS, check_parity, make_case

from radixrt.attention.base import LayerAttention
from radixrt.attention.flashinfer_backend import FlashInferAttention

HAS_CUDA = torch.cuda.is_available()
HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_FLASHINFER), reason="needs a CUDA device and flashinfer")


def _paged_attention(q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, last_page_len, causal, sm_scale,
                     window_left=-1, logits_soft_cap=None):  # fmt: skip
    """flashinfer's contract, in float64: request b's keys fill its pages, the last one partly."""
    page_size = k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(len(last_page_len)):
        pages = kv_indices[kv_indptr[b] : kv_indptr[b + 1]].tolist()
        kv_len = (len(pages) - 1) * page_size + int(last_page_len[b])
        keys = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:kv_len].double()
        values = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:kv_len].double()
        lo, hi = int(qo_indptr[b]), int(qo_indptr[b + 1])
        group = q.shape[1] // keys.shape[1]
        scores = torch.einsum("thd,lhd->htl", q[lo:hi].double(), keys.repeat_interleave(group, 1)) * sm_scale
        if logits_soft_cap:  # None or 0: off
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        query_pos = torch.arange(hi - lo)[:, None] + kv_len - (hi - lo)  # aligned to the end of the keys
        key_pos = torch.arange(kv_len)[None, :]
        if causal:  # query i of qo_len sees keys j <= i + kv_len - qo_len
            scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
        if window_left >= 0:  # and keys j >= its position - window_left
            scores = scores.masked_fill(key_pos < query_pos - window_left, float("-inf"))
        out[lo:hi] = torch.einsum("htl,lhd->thd", scores.softmax(-1), values.repeat_interleave(group, 1))
    return out.to(q.dtype)


class _Wrapper:
    planned: list = []

    def __init__(self, workspace, kv_layout="NHD", use_tensor_cores=False):
        assert kv_layout == "NHD" and workspace.dtype == torch.uint8
        self.use_tensor_cores = use_tensor_cores

    def _check_index(self, *tensors):
        assert all(t.dtype == torch.int32 for t in tensors), "flashinfer takes int32 page indices"


class FakeDecode(_Wrapper):
    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *,
             pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None, sm_scale=None, q_data_type=None,
             kv_data_type=None):  # fmt: skip
        self._check_index(indptr, indices, last_page_len)
        assert pos_encoding_mode == "NONE" and q_data_type == kv_data_type
        self.args = (indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, sm_scale)
        self.variant = dict(window_left=window_left, logits_soft_cap=logits_soft_cap)
        _Wrapper.planned.append(("decode", self.use_tensor_cores))

    def run(self, q, paged_kv_cache):
        indptr, indices, last, heads, kv_heads, dim, page_size, scale = self.args
        k_cache, v_cache = paged_kv_cache
        assert q.shape == (len(last), heads, dim) and k_cache.shape[1:] == (page_size, kv_heads, dim)
        qo = torch.arange(len(last) + 1)
        return _paged_attention(q, k_cache, v_cache, qo, indptr, indices, last, False, scale, **self.variant)


class FakePrefill(_Wrapper):
    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads, num_kv_heads,
             head_dim_qk, page_size, *, causal=False, window_left=-1, logits_soft_cap=None, sm_scale=None,
             q_data_type=None, kv_data_type=None):  # fmt: skip
        self._check_index(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len)
        self.args = (qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads, causal,
                     sm_scale)  # fmt: skip
        self.variant = dict(window_left=window_left, logits_soft_cap=logits_soft_cap)
        _Wrapper.planned.append(("prefill", causal))

    def run(self, q, paged_kv_cache):
        qo, indptr, indices, last, heads, causal, scale = self.args
        assert q.shape[0] == int(qo[-1]) and q.shape[1] == heads
        return _paged_attention(q, *paged_kv_cache, qo, indptr, indices, last, causal, scale, **self.variant)


FAKE = SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=FakeDecode, BatchPrefillWithPagedKVCacheWrapper=FakePrefill)


@pytest.mark.parametrize("heads, kv_heads, page_size, dtype", [
    (4, 4, 16, torch.bfloat16), (9, 3, 1, torch.bfloat16), (8, 2, 16, torch.float16),
], ids=["mha-page16-bf16", "gqa3-page1-bf16", "gqa4-page16-fp16"])  # fmt: skip
@pytest.mark.parametrize("batch", list(BATCHES))
def test_glue_against_flashinfer_contract(batch, heads, kv_heads, page_size, dtype):
    _Wrapper.planned = []
    shapes = BATCHES[batch]
    check_parity(FlashInferAttention(FAKE), make_case(shapes, page_size, heads, kv_heads, 64, dtype, seed=page_size))
    decode_only = all(n == 1 for _, n in shapes)
    assert _Wrapper.planned == ([("decode", heads // kv_heads >= 4)] if decode_only else [("prefill", True)])


def test_plans_once_per_step():
    _Wrapper.planned = []
    case = make_case(BATCHES["mixed"], 16, 4, 2, 64, torch.bfloat16)
    backend = FlashInferAttention(FAKE)
    backend.prepare(case.batch, case.pool)
    for layer in range(2):
        backend.forward(layer, case.q, case.k, case.v, case.batch, case.pool)
    assert _Wrapper.planned == [("prefill", True)]


@pytest.mark.parametrize("layer", ["window5", "window40-softcap", "softcap"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_glue_passes_window_softcap_scale(batch, layer):
    check_parity(FlashInferAttention(FAKE), make_case(BATCHES[batch], 4, 9, 3, 64, torch.bfloat16), LAYERS[layer])


def test_one_plan_per_distinct_layer_attention():
    """Gemma-like layers alternate sliding and full attention: two plans a step, each reused."""
    _Wrapper.planned = []
    case = make_case(BATCHES["mixed"], 16, 4, 2, 64, torch.bfloat16)
    backend = FlashInferAttention(FAKE)
    backend.prepare(case.batch, case.pool)
    sliding, full = LayerAttention(scale=0.2, sliding_window=8), LayerAttention(scale=0.2)
    for layer, params in enumerate([sliding, full, sliding, full]):
        backend.forward(layer % 2, case.q, case.k, case.v, case.batch, case.pool, params)
    assert _Wrapper.planned == [("prefill", True), ("prefill", True)]
    assert len(case.batch.backend_state["plans"]) == 2


def test_float32_runs_on_torch_reference():
    _Wrapper.planned = []
    check_parity(FlashInferAttention(FAKE), make_case(BATCHES["mixed"], 16, 4, 2, 64, torch.float32))
    assert _Wrapper.planned == []


# ----- the real library, on a GPU ---------------------------------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (9, 3), (8, 2)], ids=["mha", "gqa3", "gqa4"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_flashinfer_parity_on_gpu(batch, page_size, heads, kv_heads, dtype):
    case = make_case(BATCHES[batch], page_size, heads, kv_heads, 64, dtype, seed=page_size, device="cuda")
    check_parity(FlashInferAttention(), case)


@gpu
@pytest.mark.gpu
def test_auto_picks_flashinfer_on_cuda():
    from radixrt.attention import make_attention_backend

    assert isinstance(make_attention_backend("auto", "cuda"), FlashInferAttention)


@gpu
@pytest.mark.gpu
def test_engine_flashinfer_matches_torch_on_gpu(tmp_path):
    """Prompt log-probs through the whole model (prefix cache, chunked prefill, decode) agree."""
    from conftest import make_tiny_checkpoint

    from radixrt import Engine

    folder = make_tiny_checkpoint(tmp_path, "llama", hidden_size=384, num_attention_heads=6, num_key_value_heads=2)
    prompts = [list(range(3, 60)), list(range(3, 60)) + [7, 8, 9], [11] * 40]
    params = {"max_new_tokens": 4, "temperature": 0, "prompt_logprobs": True}
    results = {}
    for backend in ("torch", "flashinfer"):
        with Engine(str(folder), device="cuda", dtype="bfloat16", page_size=16, chunked_prefill_size=32,
                    attention_backend=backend) as engine:  # fmt: skip
            results[backend] = engine.generate(input_ids=prompts, sampling_params=params)
    for ref, out in zip(results["torch"], results["flashinfer"]):
        a, b = torch.tensor(ref.prompt_logprobs[1:]), torch.tensor(out.prompt_logprobs[1:])
        assert torch.allclose(a, b, atol=5e-2), (a - b).abs().max()
