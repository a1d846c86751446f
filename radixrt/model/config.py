"""The model shape radixrt needs, read from a Hugging Face `config.json`.

The checkpoint's config is first parsed by transformers' own config class for its family, so
every default and legacy spelling (Qwen2's `use_sliding_window`, Gemma 3's layer pattern and local
rope base, Phi-3's `rope_scaling`) means here what it means in transformers. The few ways the
families differ become small named switches; `model/llama.py` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Architecture -> transformers model_type (whose config class parses the checkpoint's config.json).
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",  # also SmolLM
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",  # also Phi-4 and Phi-4-mini
}
SUPPORTED_ARCHITECTURES = tuple(MODEL_TYPES)
# A bare config (e.g. read from a GGUF) may name only its model_type.
_BY_MODEL_TYPE = {model_type: arch for arch, model_type in MODEL_TYPES.items()}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Rope kinds whose max_position_embeddings is the pre-scaling length: the model serves `factor` times
# it (SGLang's get_context_length). yarn, longrope and llama3 name the original length themselves.
_CONTEXT_SCALING_ROPE = ("linear", "dynamic")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one radixrt implements."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float  # of the full-attention layers (Gemma 3's sliding layers have their own)
    max_position_embeddings: int  # the longest context served (see _CONTEXT_SCALING_ROPE)
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2 puts a bias on q/k/v projections
    rope_scaling: dict[str, Any] | None = None  # transformers' rope parameters when not the default kind
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    sliding_window: int | None = None  # keys a sliding layer's query sees, itself included
    # Per layer, transformers' names: "sliding_attention" layers use sliding_window, "full_attention" see all.
    layer_types: tuple[str, ...] = ()
    hidden_act: str = "silu"  # the gated MLP's activation, by transformers' ACT2FN name
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's q and k before rotary
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + weight)
    sandwich_norms: bool = False  # Gemma: norms on the attention and MLP outputs as well as inputs
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(hidden_size)
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_logit_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma 2 (and Gemma 3 if set): the same on the logits
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # transformers' parsed config: what its rope-init functions read (model/rope.py).
    hf: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed config.json; raise UnsupportedModelError for other families."""
        archs = hf.get("architectures") or [_BY_MODEL_TYPE.get(hf.get("model_type"), "")]
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            named = ", ".join(a for a in archs if a) or f"model_type={hf.get('model_type')!r}"
            raise UnsupportedModelError(
                f"unsupported architecture {named}; radixrt supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if missing := [key for key in _REQUIRED if key not in hf]:
            raise KeyError(missing[0])  # transformers would fill in its class default silently
        tc = _transformers_config(arch, hf)
        if getattr(tc, "use_bidirectional_attention", False):
            raise UnsupportedModelError(f"{arch} with use_bidirectional_attention (embeddings) is not supported")
        gemma = arch in _GEMMA
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        rope = _full_attention_rope(tc)
        sliding_window = getattr(tc, "sliding_window", None)
        layer_types = getattr(tc, "layer_types", None) or (
            ["sliding_attention" if sliding_window else "full_attention"] * tc.num_hidden_layers
        )
        if "sliding_attention" not in layer_types:
            sliding_window = None
        max_positions = tc.max_position_embeddings
        if rope["rope_type"] in _CONTEXT_SCALING_ROPE:
            max_positions = int(max_positions * rope["factor"])
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=tc.vocab_size,
            hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size,
            num_layers=tc.num_hidden_layers,
            num_heads=tc.num_attention_heads,
            num_kv_heads=getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=tc.rms_norm_eps,
            rope_theta=float(rope["rope_theta"]),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(tc.tie_word_embeddings),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(getattr(tc, "attention_bias", False)),
            rope_scaling=dict(rope) if rope["rope_type"] != "default" else None,
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
            sliding_window=sliding_window,
            layer_types=tuple(layer_types),
            hidden_act=getattr(tc, "hidden_activation", None) or getattr(tc, "hidden_act", "silu"),
            qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
            norm_unit_offset=gemma,
            sandwich_norms=gemma,
            embed_scale=tc.hidden_size**0.5 if gemma else 1.0,
            attn_scale=tc.query_pre_attn_scalar**-0.5 if gemma else None,
            # transformers applies the attention soft cap in Gemma 2 only (Gemma 3's config has the field, unused).
            attn_logit_softcap=tc.attn_logit_softcapping if arch == "Gemma2ForCausalLM" else None,
            final_logit_softcap=tc.final_logit_softcapping if gemma else None,
            extra=hf,
            hf=tc,
        )

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer, or None where it attends to every earlier key."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V for one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def _transformers_config(arch: str, hf: dict[str, Any]):
    """transformers' config object for the checkpoint, as `AutoConfig.from_pretrained` would build it."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[MODEL_TYPES[arch]].from_dict(hf)


def _full_attention_rope(tc) -> dict[str, Any]:
    """The rope parameters of the full-attention layers (Gemma 3 keeps one set per layer type)."""
    rope = tc.rope_parameters
    return rope["full_attention"] if isinstance(rope.get("full_attention"), dict) else rope
