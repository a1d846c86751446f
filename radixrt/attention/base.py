"""The attention backend seam: one forward step's layout, and the interface backends implement.

A step runs the new tokens of several requests at once, flattened into one token axis::

    tokens:      [ r0: 5 new (prefill chunk) | r1: 1 new (decode) | r2: 1 new (decode) ]
    qo_indptr:   [0, 5, 6, 7]
    prefix_lens: [11, 40, 7]      KV already in pages before this step
    seq_lens:    [16, 41, 8]      prefix + new: what each request attends over
    page_table:  one row of page ids per request; token i of request b sits in
                 slot page_table[b][i // page_size] * page_size + i % page_size

New token t of request b attends causally: to every key at position <= prefix_lens[b] + t, or in a
sliding-window layer only to the last `sliding_window` of them (itself included), as `LayerAttention`
says per layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from radixrt.cache.page_pool import KVPool


@dataclass
class ForwardBatch:
    """Everything the model and the attention backend need for one step."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_slots: torch.Tensor  # [T] int64: the flat KV slot each new token's K/V goes to
    qo_indptr: list[int]  # [B + 1]
    prefix_lens: list[int]  # [B]
    seq_lens: list[int]  # [B]
    page_tables: list[list[int]]  # [B][pages]
    logits_indices: torch.Tensor  # [R] rows of the token axis whose logits are wanted
    page_size: int
    # Filled by the backend's `prepare`, shared by every layer of this step.
    backend_state: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.qo_indptr[-1]

    @property
    def is_decode_only(self) -> bool:
        return self.num_tokens == self.batch_size


@dataclass(frozen=True)
class LayerAttention:
    """How one layer attends: softmax(softcap(q . k * scale) + mask) v, the mask causal and maybe windowed.

    Every backend applies all three (the model builds one per layer from its ModelConfig).
    """

    scale: float
    sliding_window: int | None = None  # keys a query sees, itself included (transformers' meaning); None: all
    logit_softcap: float | None = None  # Gemma 2: scores -> logit_softcap * tanh(scores / logit_softcap)

    @classmethod
    def plain(cls, head_dim: int) -> "LayerAttention":
        """Causal attention with the usual 1/sqrt(head_dim) scale."""
        return cls(scale=head_dim**-0.5)

    @property
    def window_left(self) -> int:
        """The window as flashinfer (and csrc/) take it: how many keys before the query it sees; -1: all."""
        return -1 if self.sliding_window is None else self.sliding_window - 1


class AttentionBackend(ABC):
    """Writes the step's new K/V into the pool and attends over each request's pages."""

    name: str = "abstract"

    @abstractmethod
    def prepare(self, batch: ForwardBatch, pool: KVPool) -> None:
        """Build per-step metadata once (index tensors, masks), stored in batch.backend_state."""

    @abstractmethod
    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        batch: ForwardBatch,
        pool: KVPool,
        params: LayerAttention | None = None,  # None: LayerAttention.plain(head_dim)
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Store k/v at batch.out_slots in layer `layer`, then return its attention output."""


def write_kv(pool: KVPool, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Scatter the step's new K/V rows into their page slots."""
    pool.flat_k(layer).index_copy_(0, slots, k.to(pool.dtype))
    pool.flat_v(layer).index_copy_(0, slots, v.to(pool.dtype))
