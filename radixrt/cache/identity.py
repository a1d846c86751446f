"""Which model and KV layout a disk tier belongs to, so that pages never load into another.

The identity is the content hash of the checkpoint's weight files and config.json, the KV dtype,
the page size and the KV layout (layers, KV heads, head dim), and the tier's format version. Its
hash names the tier's folder, and the whole identity is stored in the tier's index and compared
when the index is read (disk_tier.py): a different model, dtype or layout starts a tier of its
own and never reads these pages.

Hashing a checkpoint reads all of it (sha256, about 1.5 GB/s on our CPU), so each file's digest
is remembered by (path, size, mtime) in `fingerprints.json` beside the tiers: a restart with the
same files pays nothing, and a rewritten file gets a new mtime and is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

FORMAT_VERSION = 1  # bump when the page or index format changes: old tiers are then never read
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_CHUNK = 1 << 24


def tier_identity(
    model_dir: str | os.PathLike, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, page_size: int,
    memo: Path,
) -> dict[str, str | int]:  # fmt: skip
    return {
        "format": FORMAT_VERSION,
        "weights": weights_fingerprint(Path(model_dir), memo),
        "dtype": str(dtype).removeprefix("torch."),
        "page_size": page_size,
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
    }


def identity_name(identity: dict[str, str | int]) -> str:
    """A short folder name for an identity."""
    text = json.dumps(identity, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def weights_fingerprint(model_dir: Path, memo: Path) -> str:
    """One digest over every weight file and config.json of the checkpoint folder, by content."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    if not files:
        raise ValueError(f"no weight files in {model_dir}: the disk tier cannot tell which model it caches")
    known = _read_memo(memo)
    total = hashlib.sha256()
    changed = False
    for path in files:
        st = path.stat()
        key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in known:
            known[key] = _file_digest(path)
            changed = True
        total.update(f"{path.name}:{known[key]}\n".encode())
    if changed:
        _write_memo(memo, known)
    return total.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _read_memo(memo: Path) -> dict[str, str]:
    try:
        data = json.loads(memo.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_memo(memo: Path, known: dict[str, str]) -> None:
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=1))
    os.replace(tmp, memo)  # atomic: a concurrent reader sees the old or the new file
