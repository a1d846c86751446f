"""Weight-only quantized linear layers (int8, int4) for the CPU, and swapping them into a model.

A decode step at batch 1 is a read of every weight once, so its speed is the bytes of the
weights: 270 MB in bf16 for the default model, ~84 MB in int4 with group-32 scales. The
weights are stored as integers plus per-group scales (and offsets)::

    w[n, k] = scales[n, k // group_size] * q[n, k] + offsets[n, k // group_size]

    int8: q in [-128, 127], symmetric (offsets None). `quantize_int8` gives one fp32 scale per
          output channel (group_size = K); GGUF Q8_0 is group 32 with fp16 scales, Q6_K group 16
          with fp32 scales (d * sub-block scale): both map exactly.
    int4: q in [0, 15], asymmetric. `quantize_int4` gives group 32 with fp16 scale and offset
          (= min). GGUF maps exactly: Q4_0 as (d, -8 d), Q4_1 as (d, m), Q4_K as
          (d * sc, -dmin * m) per 32-input sub-block in fp32 (a product of fp16 and 6 bits).

`QuantLinear` runs `x @ W.T + b` (x bf16, fp16 or fp32, any leading shape) with one of:

    native  csrc/quant_linear.cpp: AVX512_BF16 dot products straight from the packed integers
            (activations rounded to bf16 once; sums in fp32); a portable C++ loop elsewhere.
    torch   without the native build (RADIXRT_NATIVE=0): aten's `_weight_int8pack_mm` (int8 per
            channel) and `_weight_int4pack_mm_for_cpu` (int4 in groups of 32..256; its scales and
            zeros are bf16, so it rounds Q4_0/Q4_1 scales); any other format is held dequantized
            in the model dtype and runs as a plain linear (no aten kernel covers it; nor int4 with
            out_features not a multiple of 16).

Kernel per batch size, by measurement (bench/quant_kernels.py on our 2-core Zen 5, 2 threads; all
GEMMs of one default-model decode step, int4 group 32, layers called back to back, ms):

    rows M                         1     8     32    64    128   256    512
    bf16 nn.Linear (not quantized) 7.2   8.7   16.8  29.3  45.7  82.3   171.7
    aten int4 (torch's kernel)     2.6   7.2   26.6  52.8  104   211    435
    native kernel                  1.33  3.60  13.5  27.6  54.3  106.7  233.9
    dequantize + bf16 GEMM         13.4  14.6  24.8  41.9  62.4  95.8   190.1

so `quant_linear` runs the native kernel below DEQUANTIZE_MIN_ROWS = 128 rows (decode batches)
and dequantizes to bf16 for torch's GEMM from there (prefill chunks); the two tie at 96-128 rows.
At 64 rows native and bf16 weights tie; from 128 rows on bf16 weights would be 1.05-1.2x faster:
the price of holding 3.2x fewer bytes. With distinct weights per layer, as in a real step (the int4
model is 84 MB, L3 32 MB), the M = 1 step takes 2.8-3.0 ms (28-30 GB/s) against bf16's 12 ms.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from dataclasses import dataclass, replace
from math import gcd
from types import ModuleType
from typing import Callable, Iterable, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

LANES = 16  # output channels per packed block (csrc/quant_linear.cpp)
TORCH_INT4_GROUPS = (32, 64, 128, 256)  # what aten's int4 kernel accepts
# From this many rows on, dequantizing the weight to bf16 and running torch's bf16 GEMM is as fast
# as the native quantized kernel or faster (see the table above).
DEQUANTIZE_MIN_ROWS = 128
# A dequantize threshold no chunk reaches: every row through the native kernel, which computes each row
# alone (the same bits whatever else is in the batch).
BATCH_INVARIANT = 2**62
Method = Literal["int8", "int4"]
Backend = Literal["auto", "native", "torch"]


@dataclass(frozen=True)
class QuantizedTensor:
    """A [N, K] weight as integers, one per byte, and per-group scales: the form conversions produce.

    q: int8 (bits 8) or uint8 in [0, 15] (bits 4), [N, K]. scales, offsets: float16 or float32,
    [N, K // group_size]; offsets None means zero. Rows of different tensors concatenate (`cat`)
    because groups run along K.
    """

    q: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        n, k = self.q.shape
        if k % self.group_size or self.scales.shape != (n, k // self.group_size):
            raise ValueError(f"scales {tuple(self.scales.shape)} do not fit q {n}x{k} in groups of {self.group_size}")
        offsets = self.offsets
        if offsets is not None and (offsets.shape != self.scales.shape or offsets.dtype != self.scales.dtype):
            raise ValueError("offsets must have the shape and dtype of scales")
        if self.bits == 4 and (self.q.dtype != torch.uint8 or self.offsets is None):
            raise ValueError("int4 weights are uint8 values in [0, 15] with offsets")
        if self.bits == 8 and self.q.dtype != torch.int8:
            raise ValueError("int8 weights are int8 values")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight, computed in fp32 (bit-identical to gguf.quants.dequantize for GGUF types)."""
        n, k = self.q.shape
        w = self.q.view(n, -1, self.group_size).float() * self.scales.float()[..., None]
        if self.offsets is not None:
            w = w + self.offsets.float()[..., None]
        return w.view(n, k).to(dtype)

    def with_format(self, bits: int, group_size: int, scale_dtype: torch.dtype) -> "QuantizedTensor":
        """The same values in a wider format: int4 -> int8, smaller groups, fp16 -> fp32 scales (all exact)."""
        if bits < self.bits or self.group_size % group_size or scale_dtype.itemsize < self.scales.dtype.itemsize:
            raise ValueError(f"cannot widen {self.bits}-bit g{self.group_size} into {bits}-bit g{group_size}")
        split = self.group_size // group_size
        q = self.q.to(torch.int8) if bits != self.bits else self.q
        scales = self.scales.to(scale_dtype).repeat_interleave(split, dim=1)
        offsets = None if self.offsets is None else self.offsets.to(scale_dtype).repeat_interleave(split, dim=1)
        return QuantizedTensor(q, scales, offsets, bits, group_size)

    @staticmethod
    def cat(parts: Iterable["QuantizedTensor"]) -> "QuantizedTensor":
        """Stack the rows of several tensors (q/k/v -> qkv), widening all to their common format."""
        parts = list(parts)
        bits = max(p.bits for p in parts)
        group = 0
        for p in parts:
            group = gcd(group, p.group_size)
        scale_dtype = max((p.scales.dtype for p in parts), key=lambda d: d.itemsize)
        parts = [p.with_format(bits, group, scale_dtype) for p in parts]
        if any(p.offsets is not None for p in parts):
            parts = [p if p.offsets is not None else replace(p, offsets=torch.zeros_like(p.scales)) for p in parts]
            offsets = torch.cat([p.offsets for p in parts])
        else:
            offsets = None
        return QuantizedTensor(
            torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]), offsets, bits, group
        )


def quantize_int8(weight: torch.Tensor) -> QuantizedTensor:
    """Symmetric int8 with one fp32 scale per output channel: q = round(w / s), s = max|w| / 127."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales).clamp_(-127, 127).to(torch.int8)
    return QuantizedTensor(q, scales, None, 8, w.shape[1])


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> QuantizedTensor:
    """Asymmetric int4 in groups along K: offset = group min, scale = (max - min) / 15, both fp16."""
    w = weight.detach().float()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    groups = w.view(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    offsets = low.to(torch.float16)
    scales = ((high - offsets.float()) / 15).to(torch.float16)
    divisor = torch.where(scales == 0, 1.0, scales.float())[..., None]
    q = torch.round((groups - offsets.float()[..., None]) / divisor).clamp_(0, 15).to(torch.uint8)
    return QuantizedTensor(q.view(n, k), scales, offsets, 4, group_size)


# ----- the packed layout of csrc/quant_linear.cpp -----------------------------------------------
#
#   int4 qweight [N_pad/16, K/4, 32]: chunk c of block nb, byte 2j+e:
#        low nibble = q[16nb+j, 4c+e], high nibble = q[16nb+j, 4c+2+e]
#   int8 qweight [N_pad/16, K/2, 32]: pair p of block nb, byte 2j+e = q[16nb+j, 2p+e]
#   scales, offsets [N_pad/16, K/G, 16]: the 16 channels of a block, group after group
#
#            k:  0 1 2 3 | 4 5 6 7 | ...            bytes of chunk 0 (int4):
#   channel 0:   a b c d | ...                          [a|c<<4, b|d<<4, (channel 1) ..., ...]
#   channel 1:   ...


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def pack(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(qweight, scales, offsets) in the kernel's blocked layout; channels padded to 16 with zeros."""
    n, k = qt.shape
    n_pad = -(-n // LANES) * LANES
    blocks = n_pad // LANES
    q = _pad_rows(qt.q, n_pad)
    if qt.bits == 4:
        q = q.view(blocks, LANES, k // 4, 2, 2).permute(0, 2, 1, 4, 3)  # [nb, c, j, e, h]
        qweight = (q[..., 0] | (q[..., 1] << 4)).reshape(blocks, k // 4, 2 * LANES)
    else:
        qweight = q.view(blocks, LANES, k // 2, 2).permute(0, 2, 1, 3).reshape(blocks, k // 2, 2 * LANES)

    def blocked(t: torch.Tensor) -> torch.Tensor:
        return _pad_rows(t, n_pad).view(blocks, LANES, -1).transpose(1, 2).contiguous()

    return qweight.contiguous(), blocked(qt.scales), None if qt.offsets is None else blocked(qt.offsets)


def unpack_rows(
    qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, bits: int, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q [len(rows), K], scales and offsets [len(rows), K/G] of some channels of a packed weight."""
    blocks, chunks, _ = qweight.shape
    nb, j = rows // LANES, rows % LANES
    pairs = qweight.view(blocks, chunks, LANES, 2)[nb[:, None], torch.arange(chunks)[None, :], j[:, None]]
    if bits == 4:
        q = torch.stack([pairs & 15, pairs >> 4], dim=-2).reshape(len(rows), -1)  # k = 4c + 2h + e
    else:
        q = pairs.reshape(len(rows), -1)
    return q, scales[nb, :, j], None if offsets is None else offsets[nb, :, j]


# ----- the module ---------------------------------------------------------------------------------


@functools.cache
def _native_ops() -> ModuleType | None:
    from radixrt import _native

    ops = _native.load()
    return ops if ops is not None and hasattr(ops, "quant_linear") else None


class QuantLinear(nn.Module):
    """`x @ W.T + b` with W quantized; drop-in for an nn.Linear of the same shape.

    Buffers hold the packed integers and the scales as raw bits (int16/int32), so that
    `model.to(dtype)` casts the bias but leaves the quantized weight alone.
    """

    def __init__(
        self,
        weight: QuantizedTensor,
        bias: torch.Tensor | None = None,
        backend: Backend = "auto",
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size = weight.bits, weight.group_size
        self.scale_dtype = weight.scales.dtype
        qweight, scales, offsets = pack(weight)
        raw = torch.int16 if self.scale_dtype == torch.float16 else torch.int32
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales_raw", scales.view(raw))
        self.register_buffer("offsets_raw", None if offsets is None else offsets.view(raw))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        native = backend in ("auto", "native") and _native_ops() is not None
        if backend == "native" and not native:
            raise RuntimeError("the native quantized kernels are unavailable (see radixrt._native.load_error())")
        self.backend = "native" if native else "torch"
        self.simd = True  # False: the native kernels' portable C++ loops (tests run both on AVX-512 machines)
        # From this many rows on, dequantize for torch's GEMM; never (BATCH_INVARIANT) for deterministic inference.
        self.dequantize_min_rows = DEQUANTIZE_MIN_ROWS
        self._kernel_args: tuple | None = None
        self._torch_weight = None if self.backend == "native" else _TorchWeight(weight, dtype)

    @property
    def scales(self) -> torch.Tensor:
        return self.scales_raw.view(self.scale_dtype)

    @property
    def offsets(self) -> torch.Tensor | None:
        return None if self.offsets_raw is None else self.offsets_raw.view(self.scale_dtype)

    def _kernel_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(qweight, scales, offsets) as the kernel takes them, kept between calls: a decode step
        makes ~120 of these calls, and typed views cost a microsecond each."""
        if self._kernel_args is None or self._kernel_args[0] is not self.qweight:
            self._kernel_args = (self.qweight, self.scales, self.offsets)
        return self._kernel_args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "native":
            return _native_ops().quant_linear(
                x, *self._kernel_weight(), self.bias, self.out_features, self.bits, self.group_size,
                self.dequantize_min_rows, self.simd,
            )  # fmt: skip
        out = self._torch_weight.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows of the float weight (an embedding lookup into a tied LM head): one native call, as
        ~15 torch ops on a handful of rows cost 0.2 ms of a 4 ms batch-1 step."""
        if self.backend == "native":
            return _native_ops().quant_rows(
                *self._kernel_weight(), self.out_features, self.in_features, self.bits, self.group_size, rows, dtype
            )
        q, scales, offsets = unpack_rows(self.qweight, self.scales, self.offsets, self.bits, rows.reshape(-1))
        part = QuantizedTensor(q, scales, offsets, self.bits, self.group_size)
        return part.dequantize(dtype).view(*rows.shape, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(torch.arange(self.out_features), dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
            f"group_size={self.group_size}, scales={self.scale_dtype}, backend={self.backend}"
        )


class _TorchWeight:
    """The weight in the form of the aten kernel that covers it, for builds without the native kernels."""

    def __init__(self, weight: QuantizedTensor, dtype: torch.dtype) -> None:
        n, k = weight.shape
        self.kind = "dense"
        if weight.bits == 8 and weight.offsets is None and weight.group_size == k:
            self.kind = "int8"
            self.q = weight.q.contiguous()
            self.scales = weight.scales.float().view(n)
        elif weight.bits == 4 and weight.group_size in TORCH_INT4_GROUPS and n % 16 == 0:
            self.kind = "int4"
            self.q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), 1)
            # aten dequantizes (q - 8) * scale + zero, so zero = offset + 8 * scale (rounded to dtype).
            s, o = weight.scales.float(), weight.offsets.float()
            self.scales = torch.stack([s, o + 8 * s], dim=-1).transpose(0, 1).contiguous().to(dtype)
        else:
            self.dense = weight.dequantize(dtype)
        self.group_size = weight.group_size

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int8":
            return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scales.to(x.dtype))
        if self.kind == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q, self.group_size, self.scales.to(x.dtype))
        return nn.functional.linear(x, self.dense.to(x.dtype))


class QuantEmbedding(nn.Module):
    """Embedding lookups served from a tied LM head's quantized weight (no float table kept).

    The head is registered here too, as a tied weight is: one module, two names in `state_dict`.
    """

    def __init__(self, head: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = head
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.dequantize_rows(ids, self.dtype)


# ----- swapping a model's layers ------------------------------------------------------------------


def swap_linears(
    model: nn.Module, source: Callable[[str, nn.Linear], QuantizedTensor | None], backend: Backend = "auto"
) -> nn.Module:
    """Replace each nn.Linear for which `source(name, linear)` gives a weight by a QuantLinear, in place.

    An nn.Embedding that shares its weight with a replaced layer (a tied LM head) is replaced by a
    QuantEmbedding reading the same quantized weight: one quantized table instead of a float table
    plus a quantized copy (the float table alone is 57 MB of the default model in bf16, 2 GB for a
    128k x 8k vocabulary), at the cost of dequantizing the step's few token rows.
    """
    replaced: dict[int, QuantLinear] = {}
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        weight = source(name, linear)
        if weight is None:
            continue
        if weight.shape != tuple(linear.weight.shape):
            raise ValueError(f"{name}: quantized weight {weight.shape} does not fit {tuple(linear.weight.shape)}")
        layer = QuantLinear(weight, linear.bias, backend, dtype=linear.weight.dtype)
        model.set_submodule(name, layer)
        replaced[id(linear.weight)] = layer
    for name, embedding in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]:
        if id(embedding.weight) in replaced:
            model.set_submodule(name, QuantEmbedding(replaced[id(embedding.weight)], embedding.weight.dtype))
    return model


def quantize_linears(
    model: nn.Module,
    method: Method,
    skip: Iterable[str] = (),
    group_size: int = 32,
    lm_head: Method = "int8",
    backend: Backend = "auto",
) -> nn.Module:
    """Quantize every nn.Linear of `model` in place, except names matching a `skip` pattern (fnmatch).

    int8: per-channel symmetric; int4: asymmetric in groups of `group_size` along the inputs (layers
    whose in_features it does not divide stay float, logged). The layer named `lm_head` takes the
    method `lm_head` (int8 unless told; `skip=["lm_head"]` keeps it float): as llama.cpp keeps its
    output and token-embedding tensors at 8 bits, because a tied head is also the embedding table.
    On the default model (bench/quant_quality.py) int4 everywhere raised perplexity 14.94 -> 15.94,
    all of it from the head: int4 layers with an int8 head give 14.94.
    """
    skip = tuple(skip)
    for chosen in (method, lm_head):
        if chosen not in ("int8", "int4"):
            raise ValueError(f"unknown quantization method {chosen!r} (int8, int4)")

    def source(name: str, linear: nn.Linear) -> QuantizedTensor | None:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
            return None
        chosen = lm_head if name == "lm_head" else method
        if chosen == "int8":
            return quantize_int8(linear.weight)
        if linear.in_features % group_size:
            log.info("%s stays float: in_features %d is not a multiple of %d", name, linear.in_features, group_size)
            return None
        return quantize_int4(linear.weight, group_size)

    return swap_linears(model, source, backend)
