"""`--mem-fraction-static`: SGLang's way to size the KV pool, from the memory free at start.

SGLang gives the weights and the KV pool together a fraction of the memory the device has free
when it starts; the pool gets what the weights leave:

    kv pool = mem_fraction_static x free memory - weights        (then capped by --max-total-tokens)

free memory: available RAM on a CPU (MemAvailable in /proc/meminfo: what the kernel can hand out
without swapping), free memory on CUDA (torch.cuda.mem_get_info). weights: the checkpoint's
tensors at the compute dtype (an upper bound with quantized weights). With tensor parallelism on a
CPU the ranks share the RAM, so each rank's pool gets 1/tp of it; on CUDA each rank has its GPU.

It is resolved once into `kv_memory_gb`, in the process that starts the worker, before the weights
load: every tensor-parallel rank then sizes the same pool, and a restarted worker the same one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

from radixrt.config import EngineConfig

GiB = 2**30


def available_bytes(device: str) -> int:
    """Memory free for this process's tensors on `device`."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def checkpoint_elements(model_dir: str | os.PathLike) -> int:
    """How many numbers the folder's safetensors files hold, read from their headers only."""
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count
    return total


def resolve_kv_budget(config: EngineConfig, model_dir: str | os.PathLike) -> EngineConfig:
    """`config` with kv_memory_gb set from mem_fraction_static (unchanged when that is not set).
    Raises ValueError when the fraction leaves no room for the KV pool, saying what to change."""
    if config.mem_fraction_static is None:
        return config
    import torch

    from radixrt.runner.dtype import resolve_dtype

    from_gguf = config.model is None or str(config.model).endswith(".gguf")
    dtype = resolve_dtype(config.dtype, model_dir, from_gguf, config.device)
    weights = checkpoint_elements(model_dir) * torch.finfo(dtype).bits // 8
    free = available_bytes(config.device)
    ranks_share_memory = not config.device.startswith("cuda")
    per_rank_weights = weights / config.tp_size
    kv = config.mem_fraction_static * free - (weights if ranks_share_memory else per_rank_weights)
    if ranks_share_memory:
        kv /= config.tp_size
    if kv < GiB / 1024:  # under 1 MiB: not a usable pool
        raise ValueError(
            f"--mem-fraction-static {config.mem_fraction_static:g} gives {config.mem_fraction_static * free / GiB:.2f} "
            f"GiB of the {free / GiB:.2f} GiB free to the weights and the KV pool, and the weights alone take "
            f"{weights / GiB:.2f} GiB: raise it, or size the pool with --kv-memory-gb instead"
        )
    return dataclasses.replace(config, kv_memory_gb=kv / GiB)
