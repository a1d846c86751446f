"""The grammar backend interface: compile a spec once, then one matcher per request.

A backend turns a spec (JSON schema, regex, EBNF, a list of choices, or "any JSON") into a
`CompiledGrammar`, which is immutable and shared by every request with the same spec. A
`GrammarMatcher` is one request's position in that grammar. Each decode step the sampler asks
it for the allowed tokens (`fill_bitmask`), samples, and tells it the token (`accept_token`).

Stop tokens are handled here, once, instead of in each backend: the engines disagree on what
happens after EOS (llguidance does not record an EOS that arrives once the grammar cannot
extend, so its rollback would drop one token too many). So a backend never sees a stop token;
accepting one only sets `_terminated`, and rolling back un-sets it first.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

KINDS = ("json_schema", "json_object", "regex", "ebnf", "choices")


class GrammarError(ValueError):
    """An invalid spec, or a feature the backend cannot honor. The message names the feature."""


@dataclass(frozen=True)
class CompiledGrammar:
    """A compiled spec; immutable, so one instance serves many concurrent requests."""

    backend: str
    kind: str
    spec: str
    handle: Any = field(repr=False)  # the engine's own compiled object
    compile_s: float = 0.0


class GrammarMatcher(ABC):
    """One request's state in a grammar. Not thread-safe: the step loop owns it."""

    def __init__(self, stop_token_ids: Sequence[int], vocab_size: int) -> None:
        self._stop_ids = tuple(stop_token_ids)
        self._vocab_size = vocab_size
        self._terminated = False

    # ---- the interface the sampler uses -----------------------------------------------------
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed tokens into `bitmask[row]` (int32 words, bit t%32 of word t//32)."""
        if self._terminated:  # only a stop token may follow (harmless if the caller steps once more)
            bitmask[row].zero_()
            for t in self._stop_ids:
                bitmask[row, t // 32] |= _bit(t % 32)
            return
        self._fill(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar rejects it."""
        if self._terminated or not 0 <= token_id < self._vocab_size:
            return False
        if token_id in self._stop_ids:
            if not self._is_accepting():
                return False
            self._terminated = True
            return True
        return self._accept(token_id)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (a stop token counts as one)."""
        if num_tokens > 0 and self._terminated:
            self._terminated = False
            num_tokens -= 1
        if num_tokens > 0:
            self._rollback(num_tokens)

    def is_terminated(self) -> bool:
        """True once a stop token was accepted: the output is complete and valid."""
        return self._terminated

    def copy(self) -> "GrammarMatcher":
        """An independent matcher at the same position (for fork)."""
        other = self._copy()
        other._terminated = self._terminated
        return other

    def find_jump_forward(self) -> str:
        """The text every valid continuation starts with ('' if there is a choice to make)."""
        return "" if self._terminated else self._jump_forward()

    # ---- what each backend implements -------------------------------------------------------
    @abstractmethod
    def _fill(self, bitmask: torch.Tensor, row: int) -> None: ...

    @abstractmethod
    def _accept(self, token_id: int) -> bool: ...

    @abstractmethod
    def _rollback(self, num_tokens: int) -> None: ...

    @abstractmethod
    def _is_accepting(self) -> bool: ...

    @abstractmethod
    def _copy(self) -> "GrammarMatcher": ...

    @abstractmethod
    def _jump_forward(self) -> str: ...


class GrammarBackend(ABC):
    """Compiles specs for one tokenizer. `vocab_size` is the logits width (may exceed the tokenizer).

    JSON is generated compactly with the usual separators (`{"a": 1, "b": [1, 2]}`): free
    whitespace lets a small model loop on newlines until it runs out of tokens.
    """

    name: str = ""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int] | None = None,
                 preprocess: bool = True) -> None:
        self.tokenizer = tokenizer
        # Normalize JSON schemas and refuse keywords the engine would ignore (schema.py), make
        # regex classes ASCII (regex.py). False hands specs to the engine untouched (benchmarks).
        self.preprocess = preprocess
        self.vocab_size = vocab_size
        if stop_token_ids is None:
            stop_token_ids = [tokenizer.eos_token_id]
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)

    def compile(self, kind: str, spec: str) -> CompiledGrammar:
        """Compile `spec` (see `KINDS`); raise GrammarError for anything invalid or unsupported."""
        if kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {', '.join(KINDS)}")
        start = time.perf_counter()
        try:
            handle = self._compile(kind, spec)
        except GrammarError:
            raise
        except Exception as exc:  # the engines raise RuntimeError/ValueError with their own text
            raise GrammarError(f"{self.name}: invalid {kind}: {_one_line(exc)}") from exc
        return CompiledGrammar(self.name, kind, spec, handle, time.perf_counter() - start)

    def _schema(self, spec: str) -> str:
        """The json_schema spec to hand the engine: normalized, and refused if it uses a keyword
        the engine would ignore (schema.py)."""
        from .schema import check, normalize

        if not self.preprocess:
            return spec
        schema = normalize(parse_schema(spec))
        check(schema, self.name)
        return json.dumps(schema)

    def _regex(self, spec: str) -> str:
        from .regex import ascii_classes

        return ascii_classes(spec) if self.preprocess else spec

    @abstractmethod
    def _compile(self, kind: str, spec: str) -> Any: ...

    @abstractmethod
    def matcher(self, compiled: CompiledGrammar) -> GrammarMatcher: ...


def parse_choices(spec: str) -> list[str]:
    """`choices` specs are a JSON list of non-empty strings."""
    try:
        choices = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"choices must be a JSON list of strings: {exc}") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choices must be a non-empty JSON list of non-empty strings")
    return choices


def parse_schema(spec: str) -> dict | bool:
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"json_schema must be a JSON object, not {type(schema).__name__}")
    return schema


def _bit(i: int) -> int:
    """Bit i of an int32 word as a Python int that fits int32 (bit 31 is the sign bit)."""
    return -(1 << 31) if i == 31 else 1 << i


def _one_line(exc: Exception) -> str:
    """The engine's message on one line, without xgrammar's "[time] /path/file.cc:123: " prefix."""
    lines = []
    for line in (str(exc).strip() or type(exc).__name__).splitlines():
        if line.startswith("[") and ".cc:" in line:
            line = line.split(": ", 1)[-1]
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)[:400]
