"""radixrt.lang: write multi-call LLM programs in Python; shared prefixes are computed once.

Every name here is also available from `radixrt` itself, so an SGLang frontend program
ports by changing its import to `import radixrt as sgl`. See docs/dsl.md.
"""

from radixrt.lang.api import (
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    function,
    gen,
    gen_int,
    gen_string,
    get_server_info,
    select,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from radixrt.lang.backend.base import BaseBackend
from radixrt.lang.backend.registry import get_default_backend
from radixrt.lang.choices import (
    ChoicesDecision,
    ChoicesSamplingMethod,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from radixrt.lang.errors import BackendError, ProgramError, VariableNotFoundError
from radixrt.lang.program import SglFunction
from radixrt.lang.state import ProgramState, ProgramStateGroup

# Backends import their clients (torch, httpx, openai) only when first used.
_BACKENDS = {
    "EngineBackend": "radixrt.lang.backend.engine",
    "RuntimeEndpoint": "radixrt.lang.backend.runtime_endpoint",
    "Runtime": "radixrt.lang.backend.runtime",
    "OpenAI": "radixrt.lang.backend.openai",
}


def __getattr__(name: str):
    if name in _BACKENDS:
        import importlib

        return getattr(importlib.import_module(_BACKENDS[name]), name)
    raise AttributeError(f"module 'radixrt.lang' has no attribute {name!r}")


__all__ = [
    "assistant", "assistant_begin", "assistant_end", "flush_cache", "function", "gen", "gen_int",
    "gen_string", "get_server_info", "select", "set_default_backend", "system", "system_begin",
    "system_end", "user", "user_begin", "user_end", "BaseBackend", "get_default_backend",
    "ChoicesDecision", "ChoicesSamplingMethod", "greedy_token_selection", "token_length_normalized",
    "unconditional_likelihood_normalized", "BackendError", "ProgramError", "VariableNotFoundError",
    "SglFunction", "ProgramState", "ProgramStateGroup", *_BACKENDS,
]  # fmt: skip
