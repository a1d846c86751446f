"""Attention backends behind one interface; `make_attention_backend` picks one by name."""

from __future__ import annotations

from radixrt.attention.base import AttentionBackend, ForwardBatch
from radixrt.attention.torch_ref import TorchAttention

__all__ = ["AttentionBackend", "ForwardBatch", "TorchAttention", "make_attention_backend"]


def make_attention_backend(name: str, device: str) -> AttentionBackend:
    """`auto` picks the fastest backend available on the device; the others are taken as asked."""
    if name in ("auto", "torch"):
        return TorchAttention()
    raise ValueError(f"attention backend {name!r} is not available in this build (available: auto, torch)")
