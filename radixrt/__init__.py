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
    raise AttributeError(f"module 'radixrt' has no attribute {name!r}")
