"""Constrained decoding: grammar backends behind one interface, bitmask helpers, a compile cache.

    backend = get_backend("xgrammar", tokenizer, vocab_size)
    compiler = GrammarCompiler(backend)              # compiles off the step loop, LRU-cached
    future = compiler.submit("json_schema", spec)    # the scheduler polls future.done()
    matcher = backend.matcher(future.result())       # one per request
    matcher.fill_bitmask(bitmask, row); apply_bitmask(logits, bitmask, rows); matcher.accept_token(t)
"""

from __future__ import annotations

import importlib

from .base import KINDS, CompiledGrammar, GrammarBackend, GrammarError, GrammarMatcher
from .bitmask import allocate_bitmask, apply_bitmask, bitmask_to_allowed
from .compiler import GrammarCompiler
from .tools import tool_call_schema

DEFAULT_BACKEND = "llguidance"

# name -> (module, class); a backend is imported only when asked for, so a missing package
# fails with its install line only for the backend that needs it.
BACKENDS = {
    "xgrammar": ("xgrammar_backend", "XGrammarBackend"),
    "llguidance": ("llguidance_backend", "LLGuidanceBackend"),
    "outlines": ("outlines_backend", "OutlinesBackend"),
}


def get_backend(name: str | None, tokenizer, vocab_size: int, **kwargs) -> GrammarBackend:
    """Build the named backend (`None` = DEFAULT_BACKEND) for a tokenizer and logits width."""
    name = name or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown grammar backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(tokenizer, vocab_size, **kwargs)


__all__ = [
    "BACKENDS", "DEFAULT_BACKEND", "KINDS", "CompiledGrammar", "GrammarBackend", "GrammarCompiler",
    "GrammarError", "GrammarMatcher", "allocate_bitmask", "apply_bitmask", "bitmask_to_allowed",
    "get_backend", "tool_call_schema",
]
