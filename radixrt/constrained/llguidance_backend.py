"""llguidance (Earley parser over a lazily built lexer DFA; Rust). `pip install llguidance`.

Preparation (prepare.py) turns a spec into llguidance's grammar text and validates it; building
makes one prototype `LLMatcher` from it (which checks the grammar against the tokenizer and
warms its lexer); every request gets a `deep_copy` of it, so per-request setup is a copy.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import CompiledGrammar, GrammarBackend, GrammarMatcher
from .errors import GrammarError
from .vocab import decode_complete_utf8

try:
    import llguidance as llg
    import llguidance.hf
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the llguidance grammar backend needs llguidance: pip install llguidance") from exc

class LLGuidanceMatcher(GrammarMatcher):
    def __init__(self, matcher: "llg.LLMatcher", stop_token_ids: Sequence[int], vocab_size: int) -> None:
        super().__init__(stop_token_ids, vocab_size)
        self._m = matcher

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        words = bitmask[row]
        assert words.is_contiguous() and words.device.type == "cpu" and words.dtype == torch.int32
        self._m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def _accept(self, token_id: int) -> bool:
        # try_consume_tokens leaves the matcher usable on a rejected token (consume_token would
        # put it in a permanent error state).
        return self._m.try_consume_tokens([token_id]) == 1

    def _rollback(self, num_tokens: int) -> None:
        if not self._m.rollback(num_tokens):
            raise ValueError(f"llguidance could not roll back {num_tokens} tokens: {self._m.get_error()}")

    def _is_accepting(self) -> bool:
        return self._m.is_accepting()

    def _copy(self) -> "LLGuidanceMatcher":
        return LLGuidanceMatcher(self._m.deep_copy(), self._stop_ids, self._vocab_size)

    def _jump_forward(self) -> str:
        return decode_complete_utf8(self._m.compute_ff_bytes())


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int] | None = None,
                 preprocess: bool = True) -> None:
        super().__init__(tokenizer, vocab_size, stop_token_ids, preprocess)
        self._tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                 eos_token=list(self.stop_token_ids))

    def _compile(self, kind: str, prepared: str) -> Any:
        # `prepared` is grammar text prepare.py already validated; building the matcher releases
        # the GIL (llguidance's own note; measured in docs/constrained.md).
        prototype = llg.LLMatcher(self._tok, prepared, log_level=0)
        if prototype.is_error():
            raise GrammarError(f"llguidance: invalid {kind}: {prototype.get_error()[:400]}")
        return prototype

    def matcher(self, compiled: CompiledGrammar) -> LLGuidanceMatcher:
        if compiled.backend != self.name:
            raise GrammarError(f"grammar compiled by {compiled.backend}, not {self.name}")
        return LLGuidanceMatcher(compiled.handle.deep_copy(), self.stop_token_ids, self.vocab_size)

