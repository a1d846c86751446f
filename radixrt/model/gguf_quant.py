"""A GGUF's quantized tensors, straight into `QuantizedTensor` form, without dequantizing the model.

`gguf.GGUFReader` hands each tensor over as its raw blocks ([rows, bytes per row], memory-mapped);
each block type becomes integers plus scales, with the same values `gguf.quants.dequantize` gives
(bit for bit: the float products below are exact in fp32). Blocks run along a row (K), so a
block's scale is a group scale. Layouts (ggml-common.h), one block:

    Q8_0   34 B / 32:  d f16 | q i8[32]                                w = d * q
    Q4_0   18 B / 32:  d f16 | qs u8[16]                               w = d * (q - 8)
    Q4_1   20 B / 32:  d f16 | m f16 | qs u8[16]                       w = d * q + m
                       q[i] = qs[i] & 15, q[i + 16] = qs[i] >> 4
    Q4_K  144 B / 256: d f16 | dmin f16 | 6-bit sc, m x 8 (12 B) | qs u8[128]
                       sub-block 2c + h (32 inputs) = nibble h of qs[32c : 32c + 32];
                       w = (d * sc) * q - dmin * m
    Q6_K  210 B / 256: ql u8[128] | qh u8[64] | sc i8[16] | d f16
                       q = (4 bits of ql | 2 bits of qh << 4) - 32; w = (d * sc) * q, 16 sub-blocks of 16

    -> QuantizedTensor    bits  group  scales        offsets
       Q8_0               8     32     d (f16)       -
       Q4_0               4     32     d (f16)       -8 d (f16, exact)
       Q4_1               4     32     d (f16)       m (f16)
       Q4_K               4     32     d * sc (f32)  -dmin * m (f32)
       Q6_K               8     16     d * sc (f32)  -

llama.cpp's converter permutes the rows of Llama's attn_q / attn_k (interleaved rotary halves);
transformers' GGUF loader, and so our float loader, undoes that (`_unpermute_rows`), and so do we:
the rows here match radixrt/model/loader.py's output under the same Hugging Face names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from radixrt.model.quant import Backend, QuantizedTensor, swap_linears

# Our model fuses these Hugging Face projections (radixrt/model/llama.py, load_weights).
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Hugging Face names of the Llama family's linear layers and embedding, per decoder layer / model.
# (A GGUF name can stand for several: Phi-3's fused gate/up is also "ffn_up". Files with fused
# tensors are not covered; their layers stay float, as the shapes would not fit.)
_LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
_MODEL_TENSORS = ("model.embed_tokens", "lm_head")


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte `start` of every block, as [blocks, 1]."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16 * j] bytes -> [blocks, 32 * j]: per 16 bytes, the low nibbles, then the high ones."""
    qs = qs.reshape(qs.shape[0], -1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (qs & np.uint8(15)).reshape(qs.shape[0], -1)


def _q8_0(b: np.ndarray):
    return b[:, 2:].view(np.int8), _f16(b, 0), None, 8, 32


def _q4_0(b: np.ndarray):
    d = _f16(b, 0)
    return _nibbles(b[:, 2:]), d, d * np.float16(-8), 4, 32


def _q4_1(b: np.ndarray):
    return _nibbles(b[:, 4:]), _f16(b, 0), _f16(b, 2), 4, 32


def _q4_k(b: np.ndarray):
    from gguf.quants import Q4_K

    d, dmin = _f16(b, 0).astype(np.float32), _f16(b, 2).astype(np.float32)
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & np.uint8(15)).reshape(-1, 256)
    return q, d * sc.astype(np.float32), -(dmin * m.astype(np.float32)), 4, 32


def _q6_k(b: np.ndarray):
    ql = b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    low, high = (ql & np.uint8(15)).reshape(-1, 256), (qh & np.uint8(3)).reshape(-1, 256)
    q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    scales = b[:, 192:208].view(np.int8).astype(np.float32) * _f16(b, 208).astype(np.float32)
    return q, scales, None, 8, 16


# GGML type name -> (block bytes, elements per block, converter)
BLOCK_TYPES = {"Q8_0": (34, 32, _q8_0), "Q4_0": (18, 32, _q4_0), "Q4_1": (20, 32, _q4_1),
               "Q4_K": (144, 256, _q4_k), "Q6_K": (210, 256, _q6_k)}  # fmt: skip


def blocks_to_quantized(raw: np.ndarray, type_name: str, rows: int, cols: int) -> QuantizedTensor:
    """Convert one tensor's raw GGUF blocks ([rows, bytes per row] uint8) of a type in BLOCK_TYPES."""
    block_bytes, block_elems, convert = BLOCK_TYPES[type_name]
    if cols % block_elems:
        raise ValueError(f"{type_name} rows of {cols} elements are not whole blocks of {block_elems}")
    blocks = np.ascontiguousarray(raw).reshape(-1, block_bytes)
    q, scales, offsets, bits, group = convert(blocks)

    def tensor(a: np.ndarray, width: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).reshape(rows, width)

    return QuantizedTensor(
        tensor(q, cols), tensor(scales, cols // group), None if offsets is None else tensor(offsets, cols // group),
        bits, group,
    )


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _unpermute_rows(qt: QuantizedTensor, n_head: int) -> QuantizedTensor:
    """Undo llama.cpp's q/k row order (heads of [dim/2, 2] -> [2, dim/2]), as transformers does."""
    rows = qt.shape[0]
    order = torch.arange(rows).view(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(rows)
    offsets = None if qt.offsets is None else qt.offsets[order]
    return QuantizedTensor(qt.q[order], qt.scales[order], offsets, qt.bits, qt.group_size)


def hf_names(reader) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face parameter name, for the linears and embedding of the Llama family."""
    import gguf

    arch_name = _field(reader, "general.architecture")
    arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name), None)
    if arch is None:
        raise ValueError(f"unknown GGUF architecture {arch_name!r}")
    layers = int(_field(reader, f"{arch_name}.block_count"))
    name_map = gguf.get_tensor_name_map(arch, layers)
    hf = [*_MODEL_TENSORS, *(f"model.layers.{i}.{t}" for i in range(layers) for t in _LAYER_LINEARS)]
    return {f"{name_map.get_name(h)}.weight": f"{h}.weight" for h in hf if name_map.get_name(h) is not None}


def read_quantized(path: str | os.PathLike) -> Iterator[tuple[str, QuantizedTensor]]:
    """Yield (Hugging Face name, QuantizedTensor) for every tensor of the GGUF in a type of BLOCK_TYPES.

    Float tensors (norms, and any F16/F32 linear) are left to the float loader.
    """
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv") or heads
    names = hf_names(reader)
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        if type_name not in BLOCK_TYPES or tensor.name not in names:
            continue
        cols, rows = (int(d) for d in tensor.shape)  # GGUF lists dimensions innermost first
        qt = blocks_to_quantized(tensor.data, type_name, rows, cols)
        if arch == "llama" and ".attn_q." in tensor.name:
            qt = _unpermute_rows(qt, heads)
        elif arch == "llama" and ".attn_k." in tensor.name:
            qt = _unpermute_rows(qt, kv_heads)
        yield names[tensor.name], qt


def load_gguf_linears(model: nn.Module, path: str | os.PathLike, backend: Backend = "auto") -> nn.Module:
    """Swap every linear layer of our model whose GGUF weights are quantized for a QuantLinear holding them.

    Fused layers take the rows of their parts (q/k/v, gate/up), widened to a common format where the
    parts differ (e.g. Q4_K q/k with a Q6_K v become int8 in groups of 16). A tied LM head takes the
    token embedding's tensor, and the embedding then looks its rows up in it. Layers whose weights
    are float in the GGUF stay nn.Linear.
    """
    weights = dict(read_quantized(path))
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)

    def source(name: str, _linear: nn.Linear) -> QuantizedTensor | None:
        if name == "lm_head":
            return weights.get("model.embed_tokens.weight" if tied else "lm_head.weight")
        if f"model.{name}.weight" in weights:
            return weights[f"model.{name}.weight"]
        prefix, _, leaf = name.rpartition(".")
        parts = [f"model.{prefix}.{p}.weight" for p in FUSED_PARTS.get(leaf, ())]
        if not parts or not all(p in weights for p in parts):
            return None
        return QuantizedTensor.cat(weights[p] for p in parts)

    return swap_linears(model, source, backend)
