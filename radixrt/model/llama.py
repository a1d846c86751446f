"""Our Llama-family forward (Llama, Mistral, Qwen2, SmolLM) over the paged KV cache.

The step's tokens from every request are flattened into one [T, hidden] matrix, so
prefill chunks and decode tokens share every matmul; only attention looks at request
boundaries (through the backend). q/k/v and gate/up projections are fused at load time.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from radixrt.attention.base import AttentionBackend, ForwardBatch
from radixrt.cache.page_pool import KVPool
from radixrt.model.config import ModelConfig
from radixrt.model.layers import RMSNorm, RotaryEmbedding, SwiGLU


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.rotary = rotary

    def forward(self, x, batch: ForwardBatch, pool: KVPool, backend: AttentionBackend) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(batch.positions, q, k)
        out = backend.forward(self.layer_id, q, k, v, batch, pool)
        return self.o_proj(out.reshape(-1, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_id, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, batch, pool, backend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, pool, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Parameter names follow Hugging Face's, except the fused `qkv_proj` and `gate_up_proj`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, rotary) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = rotary

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: KVPool, backend: AttentionBackend) -> torch.Tensor:
        """Run one step; return float32 logits of the rows in batch.logits_indices."""
        backend.prepare(batch, pool)
        x = self.embed_tokens(batch.input_ids)
        for layer in self.layers:
            x = layer(x, batch, pool, backend)
        x = self.norm(x[batch.logits_indices])
        return self.lm_head(x).float()

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
            elif name in params:
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
