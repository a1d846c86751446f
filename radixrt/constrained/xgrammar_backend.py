"""xgrammar (pushdown automaton with a per-state token-mask cache; C++).

Install without its triton dependency, which it needs only for GPU kernels:
`pip install --no-deps xgrammar` then `pip install apache-tvm-ffi pydantic`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import CompiledGrammar, GrammarBackend, GrammarMatcher
from .errors import GrammarError
from .vocab import token_bytes

try:
    import xgrammar as xgr
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the xgrammar grammar backend needs xgrammar: "
        "pip install --no-deps xgrammar && pip install apache-tvm-ffi pydantic"
    ) from exc


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, matcher: "xgr.GrammarMatcher", stop_token_ids: Sequence[int], vocab_size: int) -> None:
        super().__init__(stop_token_ids, vocab_size)
        self._m = matcher

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def _accept(self, token_id: int) -> bool:
        return self._m.accept_token(token_id)

    def _rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def _is_accepting(self) -> bool:
        return self._m.is_completed()

    def _copy(self) -> "XGrammarMatcher":
        return XGrammarMatcher(self._m.fork(), self._stop_ids, self._vocab_size)

    def _jump_forward(self) -> str:
        try:
            return self._m.find_jump_forward_string()
        except UnicodeDecodeError:  # the forced bytes start or end inside a character
            return ""


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int] | None = None,
                 preprocess: bool = True, max_threads: int = 1) -> None:
        super().__init__(tokenizer, vocab_size, stop_token_ids, preprocess)
        # Our own byte table, not from_huggingface: that one misses special tokens that
        # transformers does not list (SmolLM2's <reponame>, <file_sep>, ...) and lets them be
        # generated as text. An empty entry is a special token to xgrammar: never allowed.
        vocab = [data or b"" for data in token_bytes(tokenizer, vocab_size)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                                 stop_token_ids=list(self.stop_token_ids))
        # Our own LRU (compiler.py) caches compiled grammars; xgrammar's cache is kept small.
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)

    def _compile(self, kind: str, prepared: str) -> Any:
        c = self._compiler
        if kind == "json_schema":
            return c.compile_json_schema(prepared, any_whitespace=False, separators=(", ", ": "), strict_mode=True)
        if kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=(", ", ": "),
                                         strict_mode=False)  # strict would allow only {}
        if kind == "regex":
            return c.compile_regex(prepared)
        return c.compile_grammar(prepared)  # ebnf, and choices spelled as GBNF by prepare.py

    def matcher(self, compiled: CompiledGrammar) -> XGrammarMatcher:
        if compiled.backend != self.name:
            raise GrammarError(f"grammar compiled by {compiled.backend}, not {self.name}")
        m = xgr.GrammarMatcher(compiled.handle)  # rollback is unlimited
        return XGrammarMatcher(m, self.stop_token_ids, self.vocab_size)

