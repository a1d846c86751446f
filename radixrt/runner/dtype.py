"""`--dtype auto`: the compute dtype a model runs in, resolved like Hugging Face's `auto`, but for this CPU.

    auto  the checkpoint stores float32 (e.g. a random-weight test model)  -> float32
          otherwise (bf16/fp16 weights, or quantized GGUF weights) -> bfloat16 where the
          device computes it natively (CUDA; a CPU with AVX512_BF16 or AMX), else float32

bf16 matmuls run ~9x faster than fp32 on a CPU with AVX512_BF16 (docs/benchmarks.md); without
those instructions bf16 is emulated and slower than fp32. float16 is never chosen on a CPU.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX on x86, the BF16 extension on Arm (from /proc/cpuinfo; False when unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def checkpoint_dtype(model_dir: str | os.PathLike) -> str | None:
    """The dtype config.json says the weights are stored in (`torch_dtype`, or transformers 5's `dtype`)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def resolve_dtype(name: str, model_dir: str | os.PathLike, from_gguf: bool, device: str) -> torch.dtype:
    """The dtype `name` means for this checkpoint on this device. `from_gguf`: the folder is our
    float32 conversion of a quantized GGUF, whose weights are not float32 at heart."""
    if name != "auto":
        return DTYPES[name]
    if checkpoint_dtype(model_dir) == "float32" and not from_gguf:
        return torch.float32
    native = torch.device(device).type == "cuda" or (torch.device(device).type == "cpu" and cpu_has_native_bf16())
    return torch.bfloat16 if native else torch.float32
