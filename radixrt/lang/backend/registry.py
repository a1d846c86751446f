"""Which backend a program runs on: the default one, or what `run(backend=...)` names."""

from __future__ import annotations

import sys
import weakref
from typing import Any

from radixrt.lang.backend.base import BaseBackend
from radixrt.lang.backend.engine import EngineBackend

_default_backend: BaseBackend | None = None
_engine_backends: "weakref.WeakKeyDictionary[Any, BaseBackend]" = weakref.WeakKeyDictionary()


def set_default_backend(backend: Any) -> None:
    """The backend programs run on when `run(backend=...)` is not given: a backend, a Runtime or an Engine."""
    global _default_backend
    _default_backend = resolve_backend(backend)


def get_default_backend() -> BaseBackend | None:
    return _default_backend


def resolve_backend(backend: Any = None) -> BaseBackend:
    """Accept a backend, a `Runtime` (its endpoint) or a `radixrt.Engine` (wrapped once)."""
    if backend is None:
        if _default_backend is None:
            raise ValueError("no backend: call radixrt.set_default_backend(...) or pass backend=... to run()")
        return _default_backend
    if isinstance(backend, BaseBackend):
        return backend
    if isinstance(getattr(backend, "endpoint", None), BaseBackend):
        return backend.endpoint
    engine_module = sys.modules.get("radixrt.engine")
    if engine_module is not None and isinstance(backend, engine_module.Engine):
        if backend not in _engine_backends:
            _engine_backends[backend] = EngineBackend(backend)
        return _engine_backends[backend]
    raise TypeError(f"not a backend: {backend!r} (use an Engine, RuntimeEndpoint, Runtime or OpenAI backend)")
