"""The backend interface the interpreter calls, and which backend a program runs on."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator
from typing import Any

from radixrt.lang.chat_template import DEFAULT, ChatTemplate
from radixrt.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from radixrt.lang.ir import SglSamplingParams


class BaseBackend:
    """Where model calls go. `s` is the calling StreamExecutor: `s.text_` is the prompt so far."""

    chat_template: ChatTemplate = DEFAULT

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def generate(self, s, sampling_params: SglSamplingParams) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} cannot generate")

    def generate_stream(self, s, sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict[str, Any]]]:
        yield self.generate(s, sampling_params)

    def select(
        self, s, choices: list[str], temperature: float, choices_method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        raise NotImplementedError(f"{type(self).__name__} cannot score choices for select()")

    def cache_prefix(self, prefix_str: str) -> None:
        """Compute and cache the KV of this text now (a no-op where the backend has no cache)."""

    def flush_cache(self) -> bool:
        return False

    def get_server_info(self) -> dict[str, Any]:
        return {}

    def shutdown(self) -> None:
        pass


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
            from radixrt.lang.backend.engine import EngineBackend

            _engine_backends[backend] = EngineBackend(backend)
        return _engine_backends[backend]
    raise TypeError(f"not a backend: {backend!r} (use an Engine, RuntimeEndpoint, Runtime or OpenAI backend)")
