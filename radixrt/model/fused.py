"""The fused CPU forward: every decoder layer of a step in one C++ call (csrc/decoder.cpp).

`LlamaForCausalLM.forward` runs ~70 small torch ops per layer from Python; at batch 1 their
dispatch cost more than the weight reads (docs/kernels.md, "The fixed cost of a step"). Here
Python does what happens once per step (the embedding lookup, rotary angles, the page index, the
LM head) and hands the layers to C++, which calls the same matmuls (dense ATen or the packed
int4/int8 kernels) and attention kernels with no Python in between.

It covers the Llama-style families (Llama, Mistral, Qwen2, Qwen3, Phi-3: plain RMSNorm, silu or
tanh-gelu gated MLP, any rope) on the native CPU backend; anything else runs the eager forward
(`unsupported` says why). Checked against the eager forward: tests/test_fused_decoder.py.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from radixrt.attention.base import ForwardBatch
from radixrt.attention.native import paged_index
from radixrt.cache.page_pool import KVPool
from radixrt.model.llama import LlamaForCausalLM
from radixrt.model.quant import QuantLinear

_ACTIVATIONS = {"silu": False, "gelu_pytorch_tanh": True}  # name -> gelu_tanh flag of the C++ decoder


def unsupported(model: LlamaForCausalLM) -> str | None:
    """Why the fused decoder cannot run this model, or None when it can."""
    c = model.config
    if c.norm_unit_offset or c.sandwich_norms or c.embed_scale != 1.0:
        return "Gemma's norms"
    if c.hidden_act not in _ACTIVATIONS:
        return f"the {c.hidden_act} activation"
    linears = [m for m in model.layers.modules() if isinstance(m, (nn.Linear, QuantLinear))]
    if any(isinstance(m, QuantLinear) and m.backend != "native" for m in linears):
        return "quantized layers without the native kernels"
    return None


class FusedDecoder:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool, ops: ModuleType) -> None:
        reason = unsupported(model)
        if reason:
            raise ValueError(f"the fused decoder does not cover {reason}")
        c = model.config
        self.model = model
        self.ops = ops
        d = self.decoder = ops.Decoder()
        self.rope_kinds = list(model.rotary)  # the step's cos/sin tables, one per layer type
        d.layers = [self._layer(layer, self.rope_kinds.index(kind)) for layer, kind in zip(model.layers, c.layer_types)]
        d.k_caches, d.v_caches = pool.k, pool.v
        d.final_norm = model.norm.weight.data
        d.num_heads, d.num_kv_heads, d.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        d.eps = c.rms_norm_eps
        d.gelu_tanh = _ACTIVATIONS[c.hidden_act]

    def _layer(self, layer, rope: int) -> object:
        out = self.ops.DecoderLayer()
        attn = layer.self_attn
        out.input_norm = layer.input_layernorm.weight.data
        out.post_norm = layer.post_attention_layernorm.weight.data
        if attn.qk_norm:
            out.q_norm, out.k_norm = attn.q_norm.weight.data, attn.k_norm.weight.data
        out.qkv, out.o = self._linear(attn.qkv_proj), self._linear(attn.o_proj)
        out.gate_up, out.down = self._linear(layer.mlp.gate_up_proj), self._linear(layer.mlp.down_proj)
        out.scale = attn.params.scale
        out.window_left = attn.params.window_left
        out.softcap = attn.params.logit_softcap or 0.0
        out.rope = rope
        return out

    def _linear(self, module: nn.Linear | QuantLinear) -> object:
        out = self.ops.Linear()
        out.bias = None if module.bias is None else module.bias.data
        if isinstance(module, QuantLinear):
            out.qweight, out.scales, out.offsets = module.qweight, module.scales, module.offsets
            out.n, out.bits, out.group_size = module.out_features, module.bits, module.group_size
            out.dequantize_min_rows, out.simd = module.dequantize_min_rows, module.simd
        else:
            out.weight = module.weight.data
        return out

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits of the rows in batch.logits_indices, as LlamaForCausalLM.forward returns them."""
        inputs = self.ops.StepInputs()
        tables = [self.model.rotary[kind](batch) for kind in self.rope_kinds]
        inputs.cos, inputs.sin = [cos.contiguous() for cos, _ in tables], [sin.contiguous() for _, sin in tables]
        idx = paged_index(batch)
        inputs.slots = batch.out_slots
        inputs.qo_indptr, inputs.kv_indptr, inputs.kv_indices, inputs.kv_lens = (
            idx.qo_indptr, idx.kv_indptr, idx.kv_indices, idx.kv_lens,
        )  # fmt: skip
        inputs.logits_indices = batch.logits_indices
        hidden = self.decoder.forward(self.model.embed_tokens(batch.input_ids).contiguous(), inputs)
        logits = self.model.lm_head(hidden).float()
        if cap := self.model.config.final_logit_softcap:
            logits = cap * torch.tanh(logits / cap)
        return logits
