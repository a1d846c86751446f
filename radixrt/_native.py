"""Build (once per machine) and load the C++ CPU kernels in `csrc/`.

The kernels are compiled on first use with torch's extension tooling (`torch.utils.cpp_extension.load`,
ninja + the system C++ compiler) for the CPU they run on (`-march=native`), and cached under
`default_cache_dir()/torch_extensions/radixrt_native-<fingerprint>/`; the fingerprint covers the
torch and Python versions and the CPU's instruction-set flags, so a cache directory shared between
different machines never hands one a binary built for another. torch rebuilds on its own when a
source file changes.

`load()` returns the extension module, or None when it cannot be built (no compiler, no csrc/
beside the package, a compile error, RADIXRT_NATIVE=0); the reason is logged once as a warning
and kept in `load_error()`. Set RADIXRT_NATIVE_VERBOSE=1 to see the compiler's output.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("bindings.cpp", "paged_attention.cpp", "kv_store.cpp", "quant_linear.cpp", "decoder.cpp", "argmax.cpp")
_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_tried = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def fingerprint() -> str:
    """Identifies what a build is only valid for: torch, Python, architecture, CPU features."""
    key = "|".join(
        [torch.__version__, f"{sys.version_info[0]}.{sys.version_info[1]}", platform.machine(), _cpu_flags()]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def build_directory() -> Path:
    from radixrt.model.loader import default_cache_dir

    return default_cache_dir() / "torch_extensions" / f"radixrt_native-{fingerprint()}"


def _compile_flags() -> list[str]:
    # -fopenmp: at::parallel_for is a header template that runs serially unless the extension
    # itself is built with OpenMP; it then uses the libgomp torch already loaded (same soname).
    flags = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    elif platform.machine() in ("aarch64", "arm64"):
        flags.append("-mcpu=native")
    return flags


def _build() -> ModuleType:
    if os.environ.get("RADIXRT_NATIVE", "1") == "0":
        raise RuntimeError("disabled by RADIXRT_NATIVE=0")
    missing = [s for s in SOURCES if not (CSRC / s).is_file()]
    if missing:
        raise RuntimeError(f"kernel sources not found in {CSRC} (install radixrt from a source checkout)")
    if not shutil.which(os.environ.get("CXX", "c++")):
        raise RuntimeError("no C++ compiler found (install g++ or clang, or set CXX)")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    verbose = os.environ.get("RADIXRT_NATIVE_VERBOSE") == "1"
    log.info("loading radixrt native kernels from %s (compiled on first use, ~1 min)", directory)
    return cpp_extension.load(
        name="radixrt_native",
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=_compile_flags(),
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=verbose,
    )


def load() -> ModuleType | None:
    """The compiled kernels, building them on first call; None (warned once) when unavailable."""
    global _module, _error, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _module = _build()
            except Exception as exc:  # a compiler error, a missing tool: every one means "fall back"
                first_line = (str(exc).strip().splitlines() or [""])[0][:300]
                _error = f"{type(exc).__name__}: {first_line}"
                message = (
                    f"radixrt native CPU kernels are unavailable ({_error}); using the torch attention backend"
                    " (RADIXRT_NATIVE_VERBOSE=1 shows the build log)"
                )
                log.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=2)
        return _module


def load_error() -> str | None:
    """Why `load()` returned None (after it was called), else None."""
    return _error
