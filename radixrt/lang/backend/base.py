"""The backend interface the interpreter calls."""

from __future__ import annotations

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
