"""radixrt: a prefix-caching LLM runtime for agent programs."""

from radixrt.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["Engine", "EngineConfig", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Heavy imports (torch, transformers) only when the engine is actually used.
    if name == "Engine":
        from radixrt.engine import Engine

        return Engine
    if name == "EngineConfig":
        from radixrt.config import EngineConfig

        return EngineConfig
    if name in _LANG_NAMES:  # the DSL (docs/dsl.md): `import radixrt as sgl` ports an SGLang program
        import radixrt.lang

        return radixrt.lang.choices if name == "choices" else getattr(radixrt.lang, name)
    raise AttributeError(f"module 'radixrt' has no attribute {name!r}")


_LANG_NAMES = frozenset(
    "function gen gen_int gen_string select system user assistant system_begin system_end user_begin "
    "user_end assistant_begin assistant_end set_default_backend flush_cache get_server_info "
    "RuntimeEndpoint Runtime OpenAI EngineBackend choices token_length_normalized greedy_token_selection "
    "unconditional_likelihood_normalized ProgramState ProgramError VariableNotFoundError BackendError".split()
)
