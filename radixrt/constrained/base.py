"""The grammar backend interface: compile a spec once, then one matcher per request.

A backend turns a spec (JSON schema, regex, EBNF, a list of choices, or "any JSON") into a
`CompiledGrammar`, which is immutable and shared by every request with the same spec, in two
steps: `prepare` (prepare.py: Python, untrusted input, run in a separate process by
compiler.py) makes the text the engine compiles, and `build` compiles it natively. A
`GrammarMatcher` is one request's position in that grammar. Each decode step the sampler asks
it for the allowed tokens (`fill_bitmask`), samples, and tells it the token (`accept_token`).

Stop tokens are handled here, once, instead of in each backend: the engines disagree on what
happens after EOS (llguidance does not record an EOS that arrives once the grammar cannot
extend, so its rollback would drop one token too many). So a backend never sees a stop token;
accepting one only sets `_terminated`, and rolling back un-sets it first.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .errors import GrammarError, one_line
from .prepare import LENIENT, Prepared, prepare


@dataclass(frozen=True)
class CompiledGrammar:
    """A compiled spec; immutable, so one instance serves many concurrent requests."""

    backend: str
    kind: str
    spec: str
    handle: Any = field(repr=False)  # the engine's own compiled object
    compile_s: float = 0.0
    unenforced: tuple[str, ...] = ()  # lenient json_schema: JSON pointers of the keywords dropped


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
    preprocess: bool = True

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
        """Prepare and build `spec` (see `KINDS`) in this thread; raise GrammarError for anything
        invalid or unsupported. For tests and benchmarks: a server compiles through
        GrammarCompiler, which prepares in a separate process."""
        return self.build(kind, spec, prepare(self.name, kind, spec, self.preprocess))

    def build(self, kind: str, spec: str, prepared: Prepared) -> CompiledGrammar:
        """The engine object for `prepared`, what `prepare` made of `spec`. Native code that
        releases the GIL, so it may run on a thread beside the step loop."""
        start = time.perf_counter()
        engine_kind = "json_schema" if kind == LENIENT else kind  # the schema is relaxed already
        try:
            handle = self._compile(engine_kind, prepared.text)
        except GrammarError:
            raise
        except Exception as exc:  # the engines raise RuntimeError/ValueError with their own text
            raise GrammarError(f"{self.name}: invalid {engine_kind}: {one_line(exc)}") from exc
        return CompiledGrammar(self.name, kind, spec, handle, time.perf_counter() - start, prepared.unenforced)

    @abstractmethod
    def _compile(self, kind: str, prepared: str) -> Any:
        """The engine's compiled object for the text `prepare` returned for this backend."""

    @abstractmethod
    def matcher(self, compiled: CompiledGrammar) -> GrammarMatcher: ...


def _bit(i: int) -> int:
    """Bit i of an int32 word as a Python int that fits int32 (bit 31 is the sign bit)."""
    return -(1 << 31) if i == 31 else 1 << i

