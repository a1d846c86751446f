"""Our decoder forward over the paged KV cache, for every supported family.

Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3/4 and SmolLM share one structure; where
they differ, a small switch of `ModelConfig` says how:

    qk_norm             RMSNorm over each head's q and k before rotary         Qwen3, Gemma 3
    norm_unit_offset    RMSNorm scales by (1 + weight)                           Gemma
    sandwich_norms      the attention and MLP outputs are normalized too         Gemma
    embed_scale         embeddings times sqrt(hidden_size)                       Gemma
    hidden_act          the gated MLP's activation (silu; gelu_pytorch_tanh)     Gemma: GeGLU
    attn_scale, attn_logit_softcap, layer_types + sliding_window
                        per layer `LayerAttention`, applied inside the backend   Gemma, Mistral, Qwen, Phi-3
    final_logit_softcap cap * tanh(logits / cap)                                 Gemma 2
    rope                `model/rope.py`, one per layer type                      Gemma 3: local and global

The step's tokens from every request are flattened into one [T, hidden] matrix, so prefill chunks
and decode tokens share every matmul; only attention looks at request boundaries (through the
backend). q/k/v and gate/up projections are fused (at load time, unless the checkpoint has them
fused already, as Phi-3 does).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from radixrt.attention.base import AttentionBackend, ForwardBatch, LayerAttention
from radixrt.cache.page_pool import KVPool
from radixrt.model.config import ModelConfig
from radixrt.model.layers import GatedMLP, RMSNorm
from radixrt.model.rope import RotaryEmbedding, apply_rotary

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin of the step's tokens


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_unit_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_unit_offset)
        self.params = LayerAttention(
            scale=config.attn_scale or self.head_dim**-0.5,
            sliding_window=config.layer_window(layer_id),
            logit_softcap=config.attn_logit_softcap,
        )

    def forward(self, x, rope: Rope, batch: ForwardBatch, pool: KVPool, backend: AttentionBackend) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = backend.forward(self.layer_id, q, k, v, batch, pool, self.params)
        return self.o_proj(out.reshape(-1, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        hidden, eps, offset = config.hidden_size, config.rms_norm_eps, config.norm_unit_offset
        self.input_layernorm = RMSNorm(hidden, eps, offset)
        self.self_attn = Attention(config, layer_id)
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset)
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_act)
        self.sandwich_norms = config.sandwich_norms
        if self.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(hidden, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(hidden, eps, offset)

    def forward(self, x, rope: Rope, batch, pool, backend) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), rope, batch, pool, backend)
        if not self.sandwich_norms:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        # Gemma: post_attention_layernorm normalizes the attention output; the MLP has a norm on each side.
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class LlamaForCausalLM(nn.Module):
    """Parameter names follow Hugging Face's, with q/k/v fused into `qkv_proj` and gate/up into `gate_up_proj`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = nn.ModuleDict({kind: RotaryEmbedding(config, kind) for kind in dict.fromkeys(config.layer_types)})

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: KVPool, backend: AttentionBackend) -> torch.Tensor:
        """Run one step; return float32 logits of the rows in batch.logits_indices."""
        backend.prepare(batch, pool)
        x = self.embed_tokens(batch.input_ids)
        if self.config.embed_scale != 1.0:  # rounded to the weights' dtype first, as transformers does
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        rope = {kind: rotary(batch) for kind, rotary in self.rotary.items()}
        for layer, kind in zip(self.layers, self.config.layer_types):
            x = layer(x, rope[kind], batch, pool, backend)
        x = self.norm(x[batch.logits_indices])
        logits = self.lm_head(x).float()
        if cap := self.config.final_logit_softcap:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up as they arrive."""
        params = dict(self.named_parameters())
        fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                 "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}  # fmt: skip
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                target, shard = fused[parts[-2]]
                name = ".".join(parts[:-2] + [target, parts[-1]])
                dest = params[name].data
                dest.narrow(0, self._shard_offset(target, shard), tensor.shape[0]).copy_(tensor)
            elif name in params:  # also checkpoints with qkv_proj / gate_up_proj already fused (Phi-3)
                params[name].data.copy_(tensor)
            else:
                raise ValueError(f"unexpected weight {hf_name!r} in checkpoint")
            loaded.add(name)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")

    def _shard_offset(self, target: str, shard: int) -> int:
        """Row offset of a q/k/v or gate/up shard inside its fused weight (or bias)."""
        if target == "gate_up_proj":
            return shard * self.config.intermediate_size
        c = self.config
        return [0, c.num_heads * c.head_dim, (c.num_heads + c.num_kv_heads) * c.head_dim][shard]
