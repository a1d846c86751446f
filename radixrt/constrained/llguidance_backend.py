"""llguidance (Earley parser over a lazily built lexer DFA; Rust). `pip install llguidance`.

Compiling builds one prototype `LLMatcher` (which checks the grammar against the tokenizer and
warms its lexer); every request gets a `deep_copy` of it, so per-request setup is a copy.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch

from .base import CompiledGrammar, GrammarBackend, GrammarError, GrammarMatcher, parse_choices
from .vocab import decode_complete_utf8

try:
    import llguidance as llg
    import llguidance.hf
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the llguidance grammar backend needs llguidance: pip install llguidance") from exc

# Compact JSON with the usual separators; unknown keywords are errors, not silently ignored.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                 "lenient": False}


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

    def _compile(self, kind: str, spec: str) -> Any:
        if kind == "json_schema":
            grammar = llg.LLMatcher.grammar_from_json_schema(self._schema(spec), overrides=_JSON_OPTIONS)
        elif kind == "json_object":
            grammar = llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=_JSON_OPTIONS)
        elif kind == "regex":
            grammar = llg.LLMatcher.grammar_from_regex(self._regex(spec))
        elif kind == "ebnf":
            grammar = llg.grammar_from("ebnf", spec)  # GBNF (`root ::= ...`) or Lark
        else:
            grammar = llg.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in parse_choices(spec)))
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self._tok)
        if is_error:
            raise GrammarError(f"llguidance: invalid {kind}: {' '.join(' '.join(messages).split())[:400]}")
        prototype = llg.LLMatcher(self._tok, grammar, log_level=0)
        if prototype.is_error():
            raise GrammarError(f"llguidance: invalid {kind}: {prototype.get_error()[:400]}")
        return prototype

    def matcher(self, compiled: CompiledGrammar) -> LLGuidanceMatcher:
        if compiled.backend != self.name:
            raise GrammarError(f"grammar compiled by {compiled.backend}, not {self.name}")
        return LLGuidanceMatcher(compiled.handle.deep_copy(), self.stop_token_ids, self.vocab_size)

