"""Per-request sampling parameters, shared by the Engine, the worker and the server.

`SamplingParams` is a msgspec struct so it crosses the ZMQ socket as typed data (never
pickle). Field names follow SGLang's `Engine.generate` sampling params, so a plain dict
written for SGLang works here unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

# Temperatures below this sample greedily: the argmax is what sampling tends to as T -> 0, while
# logits / T in float32 overflows to inf (then NaN) long before T reaches 0. vLLM's threshold.
MIN_TEMPERATURE = 1e-5
MAX_SALT_CHARS = 1024
_SALT_RULE = f"must be a non-empty string of at most {MAX_SALT_CHARS} characters"


class SamplingParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How to pick tokens and when to stop. `temperature` 0 (or below MIN_TEMPERATURE) is greedy."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): the whole vocabulary
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # Log probabilities: of each generated token (+ `top_logprobs` alternatives), and of the prompt.
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    # With prompt_logprobs: prompt positions before this one get None, so that prefix may come
    # from the cache (SGLang's `logprob_start_len`; `select` scores only the choice tokens).
    logprob_start_len: int = 0
    # Constrained decoding: at most one of these.
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    choices: list[str] | None = None
    # Tenants that set a salt share cached KV only with requests carrying the same salt.
    cache_salt: str | None = None

    @classmethod
    def from_any(cls, value: "SamplingParams | dict[str, Any] | None") -> "SamplingParams":
        """Accept a SamplingParams, a plain dict with the same field names, or None (defaults)."""
        if value is None:
            params = cls()
        elif isinstance(value, SamplingParams):
            params = value
        elif isinstance(value, dict):
            try:
                params = msgspec.convert(_normalize(value), cls, strict=False)
            except msgspec.ValidationError as exc:
                raise ValueError(f"invalid sampling_params: {exc}") from None
        else:
            raise ValueError(f"sampling_params must be a SamplingParams or a dict, not {type(value).__name__}")
        params.validate()
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def grammar_spec(self) -> tuple[str, str] | None:
        """The constraint as (kind, spec text), or None when unconstrained."""
        for kind in ("json_schema", "regex", "ebnf"):
            value = getattr(self, kind)
            if value is not None:
                return kind, value
        if self.choices is not None:
            return "choices", msgspec.json.encode(self.choices).decode()
        return None

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        _check(self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0", self.max_new_tokens)
        _check(self.min_new_tokens >= 0, "min_new_tokens", "must be >= 0", self.min_new_tokens)
        _check(
            self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens",
            f"must be <= max_new_tokens ({self.max_new_tokens})",
            self.min_new_tokens,
        )
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0", self.temperature)
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _check(self.top_k == -1 or self.top_k >= 0, "top_k", "must be -1 (disabled) or >= 0", self.top_k)
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        _check(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "must be > 0",
            self.repetition_penalty,
        )
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2 <= value <= 2, name, "must be in [-2, 2]", value)
        _check(self.logprob_start_len >= 0, "logprob_start_len", "must be >= 0", self.logprob_start_len)
        _check(0 <= self.top_logprobs <= 20, "top_logprobs", "must be in [0, 20]", self.top_logprobs)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings", self.stop)
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0", self.stop_token_ids)
        constraints = [k for k in ("json_schema", "regex", "ebnf", "choices") if getattr(self, k) is not None]
        _check(len(constraints) <= 1, "json_schema", "at most one of json_schema, regex, ebnf, choices", constraints)
        if self.choices is not None:
            _check(len(self.choices) > 0, "choices", "must not be empty", self.choices)
        if self.cache_salt is not None:
            _check(0 < len(self.cache_salt) <= MAX_SALT_CHARS, "cache_salt", _SALT_RULE, self.cache_salt)


def _normalize(value: dict[str, Any]) -> dict[str, Any]:
    """Accept a single stop string as SGLang and OpenAI do."""
    out = dict(value)
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    if out.get("stop") is None:
        out.pop("stop", None)
    if out.get("stop_token_ids") is None:
        out.pop("stop_token_ids", None)
    return out


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, field: str, rule: str, value: Any) -> None:
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else f"{shown[:60]}... ({len(shown):,} characters)"
        raise ValueError(f"sampling_params.{field} {rule} (got {shown})")
