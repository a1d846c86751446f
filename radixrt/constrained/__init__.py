"""Constrained decoding: grammar backends behind one interface, bitmask helpers, a compile cache.

    compiler = GrammarCompiler(lambda: get_backend("llguidance", load_tokenizer(), vocab_size))
    compiler.start()                                 # at worker start: engine setup in the background
    future = compiler.submit("json_schema", spec)    # the scheduler polls future.done(); cancel() to drop
    matcher = compiler.backend.matcher(future.result())   # one per request
    matcher.fill_bitmask(bitmask, row); apply_bitmask(logits, bitmask, rows); matcher.accept_token(t)

Names are imported on first use: a preparation process (sandbox.py) imports this package and
must not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import GrammarBackend

DEFAULT_BACKEND = "llguidance"

# name -> (module, class); a backend is imported only when asked for, so a missing package
# fails with its install line only for the backend that needs it.
BACKENDS = {
    "xgrammar": ("xgrammar_backend", "XGrammarBackend"),
    "llguidance": ("llguidance_backend", "LLGuidanceBackend"),
    "outlines": ("outlines_backend", "OutlinesBackend"),
}

# public name -> the module defining it
_EXPORTS = {
    "CompiledGrammar": "base", "GrammarBackend": "base", "GrammarMatcher": "base",
    "GrammarError": "errors", "GrammarTimeout": "errors", "GrammarTooLarge": "errors",
    "GrammarUnavailable": "errors", "GrammarLimits": "limits", "KINDS": "prepare",
    "GrammarCompiler": "compiler", "allocate_bitmask": "bitmask", "apply_bitmask": "bitmask",
    "bitmask_to_allowed": "bitmask", "tool_call_schema": "tools",
}


def get_backend(name: str | None, tokenizer, vocab_size: int, **kwargs) -> GrammarBackend:
    """Build the named backend (`None` = DEFAULT_BACKEND) for a tokenizer and logits width."""
    name = name or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown grammar backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(tokenizer, vocab_size, **kwargs)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "get_backend", *_EXPORTS]
