"""Attention backends behind one interface; `make_attention_backend` picks one by name.

    torch       the reference in plain torch: any device, any dtype
    native      C++ CPU kernels (csrc/), compiled on first use; CPU only
    flashinfer  flashinfer's paged prefill/decode kernels; CUDA only (`pip install radixrt[gpu]`)
    auto        CUDA: flashinfer if it imports, else torch.
                CPU:  native if it builds, else torch (with one warning saying why).
"""

from __future__ import annotations

import logging

import torch

from radixrt.attention.base import AttentionBackend, ForwardBatch
from radixrt.attention.torch_ref import TorchAttention

__all__ = ["AttentionBackend", "ForwardBatch", "TorchAttention", "make_attention_backend"]

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "native", "flashinfer")
_warned_no_flashinfer = False


def make_attention_backend(name: str, device: str | torch.device) -> AttentionBackend:
    """`auto` picks the fastest backend available on the device; the others are taken as asked."""
    global _warned_no_flashinfer
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (choose from {', '.join(BACKENDS)})")
    kind = torch.device(device).type
    if name == "torch":
        return TorchAttention()
    if name == "native":
        if kind != "cpu":
            raise ValueError(f"the native attention backend runs on the CPU, not on {kind}")
        return _native_backend(required=True)
    if name == "flashinfer":
        if kind != "cuda":
            raise ValueError(f"the flashinfer attention backend needs a CUDA device, not {kind}")
        return _flashinfer_backend()
    if kind == "cuda":
        try:
            return _flashinfer_backend()
        except ImportError as exc:
            if not _warned_no_flashinfer:
                log.warning("%s; using the torch attention backend", exc)
                _warned_no_flashinfer = True
            return TorchAttention()
    if kind == "cpu":
        return _native_backend(required=False) or TorchAttention()
    return TorchAttention()


def _native_backend(required: bool) -> AttentionBackend | None:
    from radixrt import _native
    from radixrt.attention.native import NativeAttention

    ops = _native.load()
    if ops is None:
        if required:
            raise RuntimeError(f"the native attention backend is unavailable: {_native.load_error()}")
        return None
    return NativeAttention(ops)


def _flashinfer_backend() -> AttentionBackend:
    from radixrt.attention.flashinfer_backend import FlashInferAttention

    return FlashInferAttention()
