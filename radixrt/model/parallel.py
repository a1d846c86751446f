"""Tensor parallelism in the model: which slice of every weight a rank holds, and the three collectives.

Each of `size` ranks holds 1/size of the attention heads, of the MLP's inner width and of the
vocabulary, and a whole copy of everything else (norms, rotary tables). Per decoder layer::

    x [T, hidden] (the same on every rank)
      │ qkv_proj, split by columns (output features): rank r computes its own heads
      │     tp=1:    [ q: heads 0..H-1          | k: KV heads     | v: KV heads     ]
      │     rank r:  [ q: heads r*H/size .. +H/size | k: its KV heads | v: its KV heads ]
      │ attention over its heads, with its own KV pool (K/V of its KV heads only)
      │ o_proj, split by rows (input features): a partial sum of the full output
      ▼ all-reduce (sum) ──────────────────────────────────────── x [T, hidden] again on every rank
      │ gate_up_proj by columns (its slice of gate and of up), act, down_proj by rows
      ▼ all-reduce (sum)

KV heads: with at least `size` of them each rank holds KV/size; with fewer, each KV head is
replicated on size/KV ranks, and rank r holds KV head r // (size/KV), the one its query heads
use (as vLLM's QKVParallelLinear). Heads that do not split evenly are refused, as SGLang and
vLLM refuse them.

The vocabulary (embedding and LM head) is split by rows, padded to a multiple of `size`::

    rows:  [ rank 0: 0 .. Vr-1 | rank 1: Vr .. 2Vr-1 | ... ]     Vr = ceil(vocab / size)
    embed: each rank looks up the ids in its rows (zeros elsewhere), then all-reduce (sum)
    head:  each rank computes the logits of its rows, gathered on rank 0 (which samples)

The collectives live in the layers' forward, not in the Linear modules: a rank's modules are
plain nn.Linear / nn.Embedding of its slice's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from radixrt.model.config import ModelConfig


class TensorParallelError(ValueError):
    """The model cannot be split this way."""


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group (torch.distributed's default group)."""

    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def embed(self, embedding: nn.Embedding, ids: torch.Tensor, first_row: int) -> torch.Tensor:
        """A vocabulary-parallel lookup: this rank's rows start at `first_row`."""
        local = ids - first_row
        outside = (local < 0) | (local >= embedding.num_embeddings)
        x = embedding(local.masked_fill(outside, 0))
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return self.all_reduce(x)

    def gather_logits(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Every rank's vocabulary columns, joined on rank 0 (padding dropped); None on the others."""
        local = local.contiguous()
        shards = [torch.empty_like(local) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(local, shards, dst=0)
        return torch.cat(shards, dim=-1)[:, :vocab_size] if shards is not None else None


@dataclass(frozen=True)
class ShardLayout:
    """The sizes and offsets of one rank's slice of the model (size 1: the whole model).

    It is also the `KVLayout` of the rank's KV pool: num_layers, num_kv_heads (its own), head_dim.
    """

    rank: int
    size: int
    num_layers: int
    head_dim: int
    num_heads: int  # query heads on this rank
    first_head: int
    num_kv_heads: int  # KV heads on this rank
    first_kv_head: int
    total_heads: int
    total_kv_heads: int
    intermediate_size: int  # this rank's share of the MLP's inner width
    vocab_rows: int  # vocabulary rows per rank (the last rank's may run past the vocabulary: padding)
    vocab_size: int

    @classmethod
    def of(cls, config: ModelConfig, rank: int = 0, size: int = 1) -> "ShardLayout":
        """Rank `rank` of `size`; TensorParallelError where the model does not split into `size`."""
        heads, kv = config.num_heads, config.num_kv_heads
        if heads % size:
            raise TensorParallelError(f"{heads} attention heads do not split over tensor-parallel size {size}")
        if (kv % size) if kv >= size else (size % kv):
            raise TensorParallelError(
                f"{kv} KV heads do not split over tensor-parallel size {size} (nor replicate evenly)"
            )
        if config.intermediate_size % size:
            raise TensorParallelError(
                f"MLP width {config.intermediate_size} does not split over tensor-parallel size {size}"
            )
        local_kv = max(1, kv // size)
        replicas = max(1, size // kv)  # ranks sharing one KV head
        vocab_rows = -(-config.vocab_size // size)
        return cls(
            rank=rank,
            size=size,
            num_layers=config.num_layers,
            head_dim=config.head_dim,
            num_heads=heads // size,
            first_head=rank * heads // size,
            num_kv_heads=local_kv,
            first_kv_head=(rank // replicas) * local_kv,
            total_heads=heads,
            total_kv_heads=kv,
            intermediate_size=config.intermediate_size // size,
            vocab_rows=vocab_rows,
            vocab_size=config.vocab_size,
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of this rank's KV heads for one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @property
    def first_vocab_row(self) -> int:
        return self.rank * self.vocab_rows

    def fused_offset(self, target: str, part: int) -> int:
        """Row offset of part `part` (q, k, v or gate, up) inside this rank's fused weight."""
        if target == "gate_up_proj":
            return part * self.intermediate_size
        return [0, self.num_heads, self.num_heads + self.num_kv_heads][part] * self.head_dim

    def unfuse(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """A checkpoint tensor fused already (Phi-3's qkv_proj, gate_up_proj) as its Hugging Face parts."""
        module, _, param = name.rpartition(".")
        owner, _, kind = module.rpartition(".")
        if kind == "qkv_proj":
            q, kv = self.total_heads * self.head_dim, self.total_kv_heads * self.head_dim
            parts = {"q_proj": q, "k_proj": kv, "v_proj": kv}
        elif kind == "gate_up_proj":
            parts = {"gate_proj": tensor.shape[0] // 2, "up_proj": tensor.shape[0] // 2}
        else:
            return [(name, tensor)]
        pieces = tensor.split(list(parts.values()), dim=0)
        return [(f"{owner}.{part}.{param}", piece) for part, piece in zip(parts, pieces)]

    def rank_slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a checkpoint tensor (Hugging Face name, unfused): rows of the
        column-parallel weights, columns of the row-parallel ones, rows of the vocabulary."""
        if self.size == 1:
            return tensor
        module = name.rpartition(".")[0].rpartition(".")[2]
        d = self.head_dim
        if module == "q_proj":
            return tensor.narrow(0, self.first_head * d, self.num_heads * d)
        if module in ("k_proj", "v_proj"):
            return tensor.narrow(0, self.first_kv_head * d, self.num_kv_heads * d)
        if module in ("gate_proj", "up_proj"):
            return tensor.narrow(0, self.rank * self.intermediate_size, self.intermediate_size)
        if module == "o_proj":
            return tensor.narrow(1, self.first_head * d, self.num_heads * d)
        if module == "down_proj":
            return tensor.narrow(1, self.rank * self.intermediate_size, self.intermediate_size)
        if module in ("embed_tokens", "lm_head"):
            rows = tensor[self.first_vocab_row : self.first_vocab_row + self.vocab_rows]
            padded = tensor.new_zeros(self.vocab_rows, *tensor.shape[1:])
            padded[: len(rows)] = rows
            return padded
        return tensor
