"""Rotary position embedding, with every scaling kind transformers knows, computed once per step.

Inverse frequencies and the attention factor come from transformers' own rope-init functions
(`ROPE_INIT_FUNCTIONS`: linear, dynamic, yarn, longrope, llama3, ...) called on the checkpoint's
transformers config; "default" (1 / theta^(2i/d)) is the one kind transformers keeps in each model
class instead, so it is written out here. As in transformers, cos and sin are multiplied by the
attention factor (yarn, longrope), only the first `2 * len(inv_freq)` features of a head rotate
(`partial_rotary_factor`, Phi-3/4), and angles are `position * inv_freq` in float32.

Two kinds depend on the sequence length; transformers recomputes them in each forward from the
longest position it is given:

    dynamic   the NTK base grows with seq_len past max_position_embeddings
    longrope  long_factor replaces short_factor past original_max_position_embeddings

Here each request uses its own seq_len in the step (cached prefix + new tokens). That is what
transformers computes for one sequence whose prompt comes in one forward and whose tokens are then
generated one by one, so those match exactly. We differ where transformers' choice depends on how
the work is batched: a prompt past the threshold that is prefilled in several chunks rotates each
chunk with the length at that chunk's end (transformers: the whole prompt's length for all of it);
a request uses its own length, not the batch's longest; and nothing carries over between requests
(transformers' dynamic rope keeps the longest length it has seen until a sequence shorter than
max_position_embeddings resets it). Keys already cached keep the rotation they were computed with,
in both, with one exception: transformers' Phi-3 `generate` drops its KV cache the first time a
sequence passes original_max_position_embeddings and recomputes it all with long factors. We keep
the cache (a prefix shared through the radix tree could not be recomputed for one request alone),
so a Phi-3 longrope sequence that crosses the threshold while generating, or between prefill
chunks, keeps its short-factor keys; one whose prompt passes it in one chunk matches transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from radixrt.attention.base import ForwardBatch
from radixrt.model.config import ModelConfig


class RotaryEmbedding(nn.Module):
    """The rope of one layer type: cos/sin of the step's tokens, from transformers' rope parameters."""

    def __init__(self, config: ModelConfig, layer_type: str) -> None:
        super().__init__()
        self.hf = config.hf
        # Gemma 3 keeps a set of rope parameters per layer type; other families one for all layers.
        self.layer_type = layer_type if isinstance(self.hf.rope_parameters.get(layer_type), dict) else None
        params = self.hf.rope_parameters[self.layer_type] if self.layer_type else self.hf.rope_parameters
        self.kind = params.get("rope_type", "default")
        self.params = params
        inv_freq, self.attention_scaling = self._init(seq_len=None)
        # A plain attribute, not a buffer: model.to(bfloat16) would round it, and the angles with it.
        self.inv_freq = inv_freq.float()
        self.length_threshold = {
            "dynamic": self.hf.max_position_embeddings,
            "longrope": params.get("original_max_position_embeddings"),
        }.get(self.kind)

    def _init(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        """(inv_freq, attention factor) as transformers computes them for a sequence of seq_len."""
        if self.kind == "default":
            head_dim = getattr(self.hf, "head_dim", None) or self.hf.hidden_size // self.hf.num_attention_heads
            dim = int(head_dim * self.params.get("partial_rotary_factor", 1.0))
            return 1.0 / (self.params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if self.kind not in ROPE_INIT_FUNCTIONS:
            supported = ", ".join(["default", *ROPE_INIT_FUNCTIONS])
            raise ValueError(f"unsupported rope type {self.kind!r} (supported: {supported})")
        kwargs = {"layer_type": self.layer_type} if self.layer_type else {}
        return ROPE_INIT_FUNCTIONS[self.kind](self.hf, None, seq_len=seq_len, **kwargs)

    def forward(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, [T, rotary_dim / 2] float32, of the step's tokens."""
        positions = batch.positions
        inv_freq = self.inv_freq.to(positions.device).expand(len(positions), -1)
        if self.length_threshold is not None:
            inv_freq = self._per_request(inv_freq, batch)
        angles = positions[:, None].float() * inv_freq
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling

    def _per_request(self, inv_freq: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Rows of requests past the length threshold get the frequencies of their own seq_len."""
        longer = [(b, n) for b, n in enumerate(batch.seq_lens) if n > self.length_threshold]
        if not longer:
            return inv_freq
        inv_freq = inv_freq.clone()
        for b, seq_len in longer:
            rows = slice(batch.qo_indptr[b], batch.qo_indptr[b + 1])
            inv_freq[rows] = self._init(seq_len=seq_len)[0].to(inv_freq)
        return inv_freq


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, head_dim] by position (neox style: halves of the rotary features) in float32.

    Only the first 2 * cos.shape[-1] features rotate; the rest pass through (partial rotary).
    """
    half = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :half].float(), x[..., half : 2 * half].float()
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return rotated if 2 * half == x.shape[-1] else torch.cat((rotated, x[..., 2 * half :]), dim=-1)
