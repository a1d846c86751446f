"""Building blocks of the decoder families: RMSNorm and the gated MLP. Rotary embedding: `rope.py`."""

from __future__ import annotations

import torch
from torch import nn

from radixrt.model.parallel import TensorParallel


class RMSNorm(nn.Module):
    """Normalizes in float32, then scales the way each family's transformers code does.

    Llama-style: cast back to the input dtype, then times `weight`. Gemma (`unit_offset`): times
    `1 + weight` in float32, then cast back (Gemma stores the weight as an offset from 1).
    """

    def __init__(self, hidden_size: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size) if unit_offset else torch.ones(hidden_size))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x32 * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused into one matmul (SwiGLU, Gemma's GeGLU).

    `act` is a transformers activation name (ACT2FN): "silu", "gelu_pytorch_tanh", ...
    Under tensor parallelism `intermediate` is this rank's share and down's partial sums are all-reduced.
    """

    def __init__(self, hidden: int, intermediate: int, act: str, tp: TensorParallel | None = None) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = ACT2FN[act]
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        out = self.down_proj(self.act(gate) * up)
        return out if self.tp is None else self.tp.all_reduce(out)
