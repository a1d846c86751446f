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
# logit_bias: OpenAI's range per token; the count bounds the per-step work (one scatter-add per entry).
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 1024
# stop_regex is matched on the last STOP_REGEX_WINDOW characters of the output (a longer match is not
# found), and a request whose patterns take longer than STOP_REGEX_BUDGET_S per new piece of text to
# match (catastrophic backtracking) fails instead of holding the front end; sane patterns take
# microseconds, and the margin covers a busy machine preempting the front end mid-search.
STOP_REGEX_WINDOW = 1024
STOP_REGEX_BUDGET_S = 0.02
# Other engines' names for these fields, accepted in a sampling_params dict (SGLang: no_stop_trim, sampling_seed).
FIELD_ALIASES = {"no_stop_trim": "include_stop_str_in_output", "sampling_seed": "seed"}


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
    stop_regex: list[str] = msgspec.field(default_factory=list)  # matched in the front end (frontend/stop_regex.py)
    include_stop_str_in_output: bool = False  # keep the matched stop string (or regex match) in the text
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # token id -> added to its logit before sampling (OpenAI's logit_bias; -100 bans, +100 forces in practice)
    logit_bias: dict[int, float] | None = None
    # Log probabilities: of each generated token (+ `top_logprobs` alternatives), and of the prompt.
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    # With prompt_logprobs: prompt positions before this one get None, so that prefix may come
    # from the cache (SGLang's `logprob_start_len`; `select` scores only the choice tokens).
    logprob_start_len: int = 0
    # Constrained decoding: at most one of these.
    json_schema: str | None = None
    # False: keywords the grammar engine cannot enforce are dropped, not refused, and listed in the
    # output (`unenforced`); OpenAI's response_format.json_schema.strict (constrained/lenient.py).
    json_schema_strict: bool = True
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
        if self.json_schema is not None and not self.json_schema_strict:
            return "json_schema_lenient", self.json_schema
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
        _check(all(isinstance(s, str) and s for s in self.stop_regex), "stop_regex", "must be non-empty",
               self.stop_regex)  # fmt: skip
        if self.logit_bias is not None:
            bias = self.logit_bias
            most = f"takes {MAX_LOGIT_BIAS_TOKENS} tokens at most"
            _check(len(bias) <= MAX_LOGIT_BIAS_TOKENS, "logit_bias", most, len(bias))
            _check(all(t >= 0 for t in bias), "logit_bias", "keys must be token ids >= 0", sorted(bias)[:3])
            _check(
                all(_finite(v) and abs(v) <= MAX_LOGIT_BIAS for v in bias.values()),
                "logit_bias",
                f"values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
                bias,
            )
        constraints = [k for k in ("json_schema", "regex", "ebnf", "choices") if getattr(self, k) is not None]
        _check(len(constraints) <= 1, "json_schema", "at most one of json_schema, regex, ebnf, choices", constraints)
        _check(self.json_schema_strict or self.json_schema is not None, "json_schema_strict",
               "applies to json_schema only (none given)", self.json_schema_strict)
        if self.choices is not None:
            _check(len(self.choices) > 0, "choices", "must not be empty", self.choices)
        if self.cache_salt is not None:
            _check(0 < len(self.cache_salt) <= MAX_SALT_CHARS, "cache_salt", _SALT_RULE, self.cache_salt)


    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError naming the field whose token ids this vocabulary does not have."""
        for name in ("stop_token_ids", "logit_bias"):
            bad = [t for t in getattr(self, name) or () if t >= vocab_size]
            _check(not bad, name, f"token ids must be < {vocab_size} (the vocabulary size)", bad[:3])


def _normalize(value: dict[str, Any]) -> dict[str, Any]:
    """Accept a single stop string (or regex) as SGLang and OpenAI do, and SGLang's field names."""
    out = dict(value)
    for alias, name in FIELD_ALIASES.items():
        if alias in out:
            given = out.pop(alias)
            if name in out and out[name] != given:
                raise ValueError(f"sampling_params.{alias} and sampling_params.{name} differ; give one of them")
            out[name] = given
    for name in ("stop", "stop_regex"):
        if isinstance(out.get(name), str):
            out[name] = [out[name]]
    for name in ("stop", "stop_regex", "stop_token_ids"):
        if out.get(name) is None:
            out.pop(name, None)
    return out


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, field: str, rule: str, value: Any) -> None:
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else f"{shown[:60]}... ({len(shown):,} characters)"
        raise ValueError(f"sampling_params.{field} {rule} (got {shown})")
