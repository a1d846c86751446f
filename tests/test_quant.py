"""Quantized linear layers and GGUF quantized tensors.

Invariants checked:
- every kernel path computes x @ W.T of the weight it holds (W = the dequantized integers), within
  an error bound stated per path against the sum of absolute products |x| @ |W|.T;
- packing is lossless: a QuantLinear dequantizes to exactly the QuantizedTensor it was built from;
- GGUF blocks convert to exactly the floats gguf.quants.dequantize gives, and the default model's
  tensors to exactly what our float loader produces under the same names;
- a quantized model's logits stay close to the float model's.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_tiny_checkpoint

from radixrt import _native
from radixrt.attention.base import ForwardBatch
from radixrt.attention.torch_ref import TorchAttention
from radixrt.cache.page_pool import KVPool
from radixrt.model import gguf_quant
from radixrt.model.llama import LlamaForCausalLM
from radixrt.model.loader import iter_weights, read_model_config
from radixrt.model.quant import (
    DEQUANTIZE_MIN_ROWS,
    QuantEmbedding,
    QuantizedTensor,
    QuantLinear,
    quantize_int4,
    quantize_int8,
    quantize_linears,
)

MODEL_SHAPES = [(576, 576), (960, 576), (3072, 576), (576, 1536), (49152, 576)]
ODD_SHAPES = [(100, 64), (24, 160)]  # channels not a multiple of 16: the padded last block
ROWS = [1, 3, 8, 32, 64, DEQUANTIZE_MIN_ROWS + 5]
NATIVE = _native.load() is not None and hasattr(_native.load(), "quant_linear")
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native kernels unavailable: {_native.load_error()}")

# Error allowed, as a fraction of |x| @ |W|.T (the sum of absolute products), per path:
#   native kernel: the reference rounds x to bf16 as the kernel does; what is left is fp32
#     summation order, plus the rounding of a bf16 output (2^-8 relative).
#   dequantize + bf16 GEMM (rows >= DEQUANTIZE_MIN_ROWS): weights rounded to bf16 too.
#   torch (aten) kernels: scales, and for int4 its zero = offset + 8 * scale, rounded to bf16
#     (2^-8 of a value up to ~2 max|w| of the group, so ~2^-7 of the group's largest product).
# The scale is |x| @ (each weight's group maximum |w|).T, since zero-point errors scale with it.
TOLERANCE = {"native": 1e-5, "dequantize": 2**-8, "torch": 2**-6}


def check_close(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, path: str, group_max: torch.Tensor) -> None:
    """|out - x @ w.T| <= tolerance * (|x| @ group_max.T), in float64, x rounded to bf16 as the path does."""
    if path != "torch":
        x = x.to(torch.bfloat16)
    expected = x.double() @ w.double().T
    scale = x.double().abs() @ group_max.double().T
    tol = TOLERANCE[path] + (2**-8 if out.dtype == torch.bfloat16 else 0.0)
    worst = ((out.double() - expected).abs() / (scale + 1e-30)).max().item()
    assert worst <= tol, f"{path}: error {worst:.2e} of the absolute-product scale exceeds {tol:.2e}"


def group_abs_max(qt: QuantizedTensor) -> torch.Tensor:
    w = qt.dequantize().abs()
    n, k = w.shape
    return w.view(n, -1, qt.group_size).amax(-1, keepdim=True).expand(-1, -1, qt.group_size).reshape(n, k)


def layer(qt: QuantizedTensor, path: str, dtype: torch.dtype) -> QuantLinear:
    lin = QuantLinear(qt, backend="torch" if path == "torch" else "native", dtype=dtype)
    lin.simd = path != "portable"
    return lin


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05 + torch.rand(n, 1, generator=g) * 0.02  # offsets per channel


# ----- quantizers ---------------------------------------------------------------------------------


def test_quantizers_round_to_nearest_level():
    w = random_weight(64, 128, 0)
    q8 = quantize_int8(w)
    assert (w - q8.dequantize()).abs().le(q8.scales / 2 * (1 + 1e-6)).all()
    assert q8.q.abs().max() == 127  # the channel maximum uses the full range
    q4 = quantize_int4(w, 32)
    err = (w - q4.dequantize()).view(64, 4, 32).abs()
    # half a step, plus the fp16 rounding of the offset (the group minimum)
    bound = q4.scales.float()[..., None] / 2 + q4.offsets.float().abs()[..., None] * 2**-11
    assert err.le(bound * (1 + 1e-5)).all()
    assert q4.q.max() <= 15


def test_constant_group_quantizes_exactly():
    w = torch.full((16, 64), 0.25)
    assert torch.equal(quantize_int4(w).dequantize(), w)
    assert torch.equal(quantize_int8(w).dequantize(), w)


# ----- packed layout and kernels ------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("n,k", ODD_SHAPES + MODEL_SHAPES[:2])
@pytest.mark.parametrize("fmt", ["int4", "int8", "int8-g16-fp32", "int4-fp32"])
def test_packing_is_lossless(n, k, fmt):
    """Rows read back from the packed layout (an embedding lookup: the native kernel, and the torch
    unpacking for builds without it) are the bits QuantizedTensor.dequantize gives, in every dtype."""
    qt = formats(random_weight(n, k, 1))[fmt]
    lin = QuantLinear(qt, backend="native")
    assert torch.equal(lin.dequantize(), qt.dequantize())
    rows = torch.tensor([[0, n - 1], [n // 2, 7 % n]])
    for backend in ("native", "torch"):
        lin.backend = backend
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(lin.dequantize_rows(rows, dtype), qt.dequantize(dtype)[rows]), (backend, dtype)
    assert torch.equal(lin.dequantize_rows(rows.int(), torch.float32), qt.dequantize()[rows])  # as nn.Embedding takes
    with pytest.raises(RuntimeError, match="out of range"):
        lin.backend = "native"
        lin.dequantize_rows(torch.tensor([n]), torch.float32)


def formats(w: torch.Tensor) -> dict[str, QuantizedTensor]:
    """int4 g32 (Q4_x), int8 per channel, and int8 in groups of 16 with fp32 scales (Q6_K's form)."""
    return {
        "int4": quantize_int4(w, 32),
        "int8": quantize_int8(w),
        "int8-g16-fp32": quantize_int4(w, 32).with_format(8, 16, torch.float32),
        # Q4_K's form: float32 scales and offsets of full precision (products not exact in float32)
        "int4-fp32": replace(q4 := quantize_int4(w, 32), scales=q4.scales.float() * 1.000123,
                             offsets=q4.offsets.float() * 0.999877),
    }


def kernel_cases():
    for n, k in MODEL_SHAPES + ODD_SHAPES:
        for rows in ROWS:
            for path in ("native", "portable", "torch"):
                if path == "portable" and n * k * rows > 40_000_000:
                    continue  # scalar loops: the small shapes cover the same code
                if n == 49152 and rows not in (1, 8, DEQUANTIZE_MIN_ROWS + 5):
                    continue
                yield n, k, rows, path


@pytest.mark.parametrize("n,k,rows,path", list(kernel_cases()))
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_kernel_matches_reference(n, k, rows, path, fmt):
    if path != "torch" and not NATIVE:
        pytest.skip("native kernels unavailable")
    w = random_weight(n, k, n + k)
    qt = formats(w)[fmt]
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).float()
    expect_path = "dequantize" if path != "torch" and rows >= DEQUANTIZE_MIN_ROWS else path
    expect_path = "native" if expect_path == "portable" else expect_path
    for dtype in (torch.float32, torch.bfloat16):
        out = layer(qt, path, dtype)(x.to(dtype))
        assert out.dtype == dtype and out.shape == (rows, n)
        check_close(out, x.to(dtype), qt.dequantize(), expect_path, group_abs_max(qt))


@needs_native
@pytest.mark.parametrize("fmt", ["int4", "int8", "int8-g16-fp32"])
@pytest.mark.parametrize("simd", [True, False])
def test_a_row_does_not_depend_on_the_other_rows(fmt, simd):
    """Below DEQUANTIZE_MIN_ROWS a row's output is the same to the bit whether it is computed alone or
    among others (tiles of 8 rows and a remainder): a speculative verify step (1 + k rows) must give
    the logits a plain decode step (1 row) gives, or bf16 greedy outputs part after a near-tie."""
    n, k = MODEL_SHAPES[0]
    lin = QuantLinear(formats(random_weight(n, k, 5))[fmt], backend="native", dtype=torch.bfloat16)
    lin.simd = simd
    g = torch.Generator().manual_seed(0)
    for rows, spread in itertools.product((2, 9, 19, DEQUANTIZE_MIN_ROWS - 1), (0, 8)):
        # (a wide exponent range shows more changes of summation order: rounding then rarely cancels)
        x = torch.randn(rows, k, generator=g) * 2.0 ** torch.randint(-spread, spread + 1, (rows, k), generator=g)
        together = lin(x.bfloat16())
        for i in sorted({0, rows // 2, rows - 1}):
            assert torch.equal(together[i : i + 1], lin(x[i : i + 1].bfloat16())), (rows, spread, i)


@pytest.mark.parametrize("rows", [1, 8, 13])
@pytest.mark.parametrize("path", ["native", "portable", "torch"])
def test_grouped_int8_with_fp32_scales(rows, path):
    """The Q6_K form (int8, groups of 16, fp32 scales) and int8 with offsets (int4 widened by `cat`);
    aten has no kernel for either, so the torch path holds them dequantized."""
    if path != "torch" and not NATIVE:
        pytest.skip("native kernels unavailable")
    w = random_weight(96, 256, 3)
    widened = quantize_int4(w, 32).with_format(8, 16, torch.float32)
    x = torch.randn(rows, 256)
    for qt in (widened, QuantizedTensor(widened.q, widened.scales, None, 8, 16)):
        out = layer(qt, path, torch.float32)(x)
        check_close(out, x, qt.dequantize(), "torch" if path == "torch" else "native", group_abs_max(qt))


def test_bias_and_leading_dims():
    qt = quantize_int8(random_weight(48, 64, 4))
    bias = torch.randn(48)
    lin = QuantLinear(qt, bias=bias, dtype=torch.float32)
    x = torch.randn(2, 3, 64)
    out = lin(x)
    assert out.shape == (2, 3, 48)
    check_close(out.reshape(6, 48) - bias, x.reshape(6, 64), qt.dequantize(), lin.backend, group_abs_max(qt))


def test_model_to_dtype_leaves_quantized_weight_alone():
    lin = QuantLinear(quantize_int4(random_weight(32, 64, 5)), bias=torch.zeros(32), dtype=torch.float32)
    before = lin.dequantize()
    lin.to(torch.bfloat16)
    assert torch.equal(lin.dequantize(), before)
    assert lin.bias.dtype == torch.bfloat16


def test_without_native_build_uses_torch_kernels():
    """RADIXRT_NATIVE=0: QuantLinear falls back to aten's kernels and still computes x @ W.T."""
    code = (
        "import torch\n"
        "from radixrt.model.quant import QuantLinear, quantize_int4, quantize_int8\n"
        "w = torch.randn(64, 128) * 0.05\n"
        "x = torch.randn(5, 128)\n"
        "for qt in (quantize_int4(w), quantize_int8(w)):\n"
        "    lin = QuantLinear(qt, dtype=torch.float32)\n"
        "    assert lin.backend == 'torch', lin.backend\n"
        "    torch.testing.assert_close(lin(x), x @ qt.dequantize().T, rtol=0.02, atol=0.02)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "RADIXRT_NATIVE": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ----- GGUF blocks --------------------------------------------------------------------------------


def random_blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid raw blocks: quantized by gguf itself where it can, else random bytes with finite fp16 scales."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    rng = np.random.default_rng(seed)
    if type_name in ("Q8_0", "Q4_0", "Q4_1"):
        data = (rng.standard_normal((rows, cols)) * 0.05 + rng.random((rows, 1)) * 0.02).astype(np.float32)
        return gguf.quants.quantize(data, qtype)
    block_bytes, block_elems, _ = gguf_quant.BLOCK_TYPES[type_name]
    raw = rng.integers(0, 256, (rows * cols // block_elems, block_bytes), dtype=np.uint8)
    scale_fields = {"Q4_K": (0, 2), "Q6_K": (208,)}[type_name]
    for start in scale_fields:
        raw[:, start : start + 2] = (rng.random((len(raw), 1)) * 0.01).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", list(gguf_quant.BLOCK_TYPES))
def test_gguf_blocks_convert_exactly(type_name):
    import gguf

    rows, cols = 48, 512
    raw = random_blocks(type_name, rows, cols, seed=len(type_name))
    qt = gguf_quant.blocks_to_quantized(raw, type_name, rows, cols)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    assert torch.equal(qt.dequantize(), torch.from_numpy(expected.reshape(rows, cols)))


def test_cat_widens_mixed_formats_exactly():
    """A Q4_K q with a Q6_K v (as in Q4_K_M files) fuse into one int8 g16 weight of the same values."""
    parts = [
        gguf_quant.blocks_to_quantized(random_blocks("Q4_K", 64, 256, 1), "Q4_K", 64, 256),
        gguf_quant.blocks_to_quantized(random_blocks("Q6_K", 32, 256, 2), "Q6_K", 32, 256),
        gguf_quant.blocks_to_quantized(random_blocks("Q4_1", 16, 256, 3), "Q4_1", 16, 256),
    ]
    fused = QuantizedTensor.cat(parts)
    assert (fused.bits, fused.group_size, fused.scales.dtype) == (8, 16, torch.float32)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_unpermute_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    qt = quantize_int4(random_weight(24, 64, 6))
    ours = gguf_quant._unpermute_rows(qt, n_head=3).dequantize().numpy()
    theirs = LlamaTensorProcessor()._reverse_permute_weights(qt.dequantize().numpy(), 3, 3)
    assert np.array_equal(ours, theirs)


@pytest.mark.slow
def test_default_gguf_tensors_match_float_loader():
    """Every quantized tensor of the default model equals, bit for bit, the float loader's tensor of that name."""
    from safetensors import safe_open

    from radixrt.model.loader import default_gguf_path, resolve_model_path

    converted = safe_open(str(resolve_model_path(None) / "model.safetensors"), "pt")
    seen = {}
    for name, qt in gguf_quant.read_quantized(default_gguf_path()):
        assert torch.equal(qt.dequantize(), converted.get_tensor(name)), name
        seen[name] = (qt.bits, qt.group_size)
    assert len(seen) == 211  # 210 Q4_1 linears + the Q8_0 token embedding (also the tied LM head)
    assert seen["model.embed_tokens.weight"] == (8, 32)
    assert seen["model.layers.0.self_attn.q_proj.weight"] == (4, 32)


# ----- whole models -------------------------------------------------------------------------------


def build_model(folder, dtype: torch.dtype) -> LlamaForCausalLM:
    model = LlamaForCausalLM(read_model_config(folder))
    model.load_weights(iter_weights(folder, dtype))
    model.to(dtype)
    model.rotary.float()
    return model.eval()


def prefill_logits(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """All-position logits of one sequence, through the paged forward with the torch attention backend."""
    page_size = 16
    pages = -(-len(ids) // page_size)
    dtype = model.norm.weight.dtype
    pool = KVPool(model.config, num_pages=pages, page_size=page_size, dtype=dtype)
    table = list(range(pages))
    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.arange(len(ids)),
        out_slots=torch.tensor([table[i // page_size] * page_size + i % page_size for i in range(len(ids))]),
        qo_indptr=[0, len(ids)],
        prefix_lens=[0],
        seq_lens=[len(ids)],
        page_tables=[table],
        logits_indices=torch.arange(len(ids)),
        page_size=page_size,
    )
    return model(batch, pool, TorchAttention())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("method,tolerance,agreement", [("int8", 0.02, 0.9), ("int4", 0.15, 0.7)])
def test_tiny_model_logits_stay_close(tmp_path, tie, method, tolerance, agreement):
    """Max logit error as a fraction of the float logits' spread (max - min), and the share of positions
    whose top token is unchanged. Measured over 6 random models: int8 0.004-0.005 and >= 0.975,
    int4 0.04-0.07 and >= 0.8."""
    folder = make_tiny_checkpoint(tmp_path, "llama", tie=tie, seed=3)
    ids = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = prefill_logits(build_model(folder, torch.float32), ids)
    model = quantize_linears(build_model(folder, torch.float32), method)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * 4 + 1  # qkv, o, gate_up, down per layer + LM head
    assert isinstance(model.embed_tokens, QuantEmbedding) == tie
    got = prefill_logits(model, ids)
    spread = (expected.max() - expected.min()).item()
    assert (got - expected).abs().max().item() <= tolerance * spread
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= agreement


def test_skip_keeps_layers_float(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "llama", tie=True, seed=4)
    model = quantize_linears(build_model(folder, torch.float32), "int4", skip=["lm_head", "layers.1.*"])
    assert isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.embed_tokens, torch.nn.Embedding)
    assert isinstance(model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(model.layers[1].mlp.down_proj, torch.nn.Linear)


@pytest.mark.slow
def test_default_model_from_gguf_matches_float_model():
    """The GGUF's own Q4_1/Q8_0 integers are the float model's weights: logits agree up to bf16 activations."""
    from radixrt.model.loader import default_gguf_path, resolve_model_path

    folder = resolve_model_path(None)
    ids = list(range(100, 164))
    expected = prefill_logits(build_model(folder, torch.float32), ids)
    model = gguf_quant.load_gguf_linears(build_model(folder, torch.float32), default_gguf_path())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 30 * 4 + 1
    assert isinstance(model.embed_tokens, QuantEmbedding)
    got = prefill_logits(model, ids)
    spread = (expected.max() - expected.min()).item()
    assert (got - expected).abs().max().item() <= 0.02 * spread
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_no_rows_give_an_empty_result(method):
    """A prefill chunk that samples nothing asks the LM head for 0 rows (it crashed the process once)."""
    weight = torch.randn(64, 128)
    layer = QuantLinear(quantize_int8(weight) if method == "int8" else quantize_int4(weight), dtype=torch.bfloat16)
    assert layer(torch.empty(0, 128, dtype=torch.bfloat16)).shape == (0, 64)
