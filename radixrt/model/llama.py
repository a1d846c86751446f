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
fused already, as Phi-3 does). Given a `TensorParallel`, each module holds its rank's slice and the
forward adds the collectives (`model/parallel.py` draws the split); without one, nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from radixrt.attention.base import AttentionBackend, ForwardBatch, LayerAttention
from radixrt.cache.page_pool import KVPool
from radixrt.model.config import ModelConfig
from radixrt.model.layers import GatedMLP, RMSNorm
from radixrt.model.parallel import ShardLayout, TensorParallel
from radixrt.model.rope import RotaryEmbedding, apply_rotary

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin of the step's tokens


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, shard: ShardLayout, tp: TensorParallel | None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = shard.num_heads, shard.num_kv_heads, config.head_dim
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
        out = self.o_proj(out.reshape(-1, self.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, shard: ShardLayout, tp: TensorParallel | None) -> None:
        super().__init__()
        hidden, eps, offset = config.hidden_size, config.rms_norm_eps, config.norm_unit_offset
        self.input_layernorm = RMSNorm(hidden, eps, offset)
        self.self_attn = Attention(config, layer_id, shard, tp)
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset)
        self.mlp = GatedMLP(hidden, shard.intermediate_size, config.hidden_act, tp)
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
    """Parameter names follow Hugging Face's, with q/k/v fused into `qkv_proj` and gate/up into `gate_up_proj`.

    `tp`: this process's rank of a tensor-parallel group; `shard` says which slice of each weight it
    holds (and is its KV pool's layout). The forward returns the logits on rank 0, None on the others.
    """

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.shard = shard = ShardLayout.of(config, tp.rank, tp.size) if tp else ShardLayout.of(config)
        self.embed_tokens = nn.Embedding(shard.vocab_rows, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, shard, tp) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        self.lm_head = nn.Linear(config.hidden_size, shard.vocab_rows, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = nn.ModuleDict({kind: RotaryEmbedding(config, kind) for kind in dict.fromkeys(config.layer_types)})

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: KVPool, backend: AttentionBackend) -> torch.Tensor | None:
        """Run one step; return float32 logits of the rows in batch.logits_indices (None on ranks > 0)."""
        backend.prepare(batch, pool)
        if self.tp is None:
            x = self.embed_tokens(batch.input_ids)
        else:
            x = self.tp.embed(self.embed_tokens, batch.input_ids, self.shard.first_vocab_row)
        if self.config.embed_scale != 1.0:  # rounded to the weights' dtype first, as transformers does
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        rope = {kind: rotary(batch) for kind, rotary in self.rotary.items()}
        for layer, kind in zip(self.layers, self.config.layer_types):
            x = layer(x, rope[kind], batch, pool, backend)
        x = self.norm(x[batch.logits_indices])
        logits = self.lm_head(x)
        if self.tp is not None:
            logits = self.tp.gather_logits(logits, self.config.vocab_size)
            if logits is None:  # ranks > 0: rank 0 samples
                return None
        logits = logits.float()
        if cap := self.config.final_logit_softcap:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in (this rank's slice of each), fusing q/k/v and gate/up as they arrive."""
        params = dict(self.named_parameters())
        fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                 "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}  # fmt: skip
        loaded: set[str] = set()
        for hf_name, checkpoint_tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            # Checkpoints with qkv_proj / gate_up_proj fused already (Phi-3) come apart into their parts here.
            for name, tensor in self.shard.unfuse(name, checkpoint_tensor):
                tensor = self.shard.rank_slice(name, tensor)
                parts = name.split(".")
                if len(parts) >= 2 and parts[-2] in fused:
                    target, part = fused[parts[-2]]
                    name = ".".join(parts[:-2] + [target, parts[-1]])
                    dest = params[name].data
                    dest.narrow(0, self.shard.fused_offset(target, part), tensor.shape[0]).copy_(tensor)
                elif name in params:
                    params[name].data.copy_(tensor)
                else:
                    raise ValueError(f"unexpected weight {hf_name!r} in checkpoint")
                loaded.add(name)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")
