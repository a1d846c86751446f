"""Shared fixtures: tiny random-weight checkpoints of each supported family, with a tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 320


def _tiny_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over TINY_VOCAB words, so tiny models run end to end through Engine."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(TINY_VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    fast.save_pretrained(folder)


# Class defaults that do not fit a tiny model: 128/256-wide heads, Phi-3's pad id 32000.
FAMILY_DEFAULTS = {
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16},
    "gemma3": {"head_dim": 16},
    "phi3": {"pad_token_id": 0},
}


def make_tiny_checkpoint(folder: Path, family: str = "llama", tie: bool = False, seed: int = 0, **overrides) -> Path:
    """Save a random-weight Hugging Face checkpoint (config.json + safetensors + tokenizer)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
    )
    common.update(FAMILY_DEFAULTS.get(family, {}))
    common.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[family]
    model = model_cls(config_cls(**common)).eval()
    # Random init leaves biases at zero; give Qwen2's q/k/v biases values so the test can see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    _tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per family/head variant the parity tests cover."""
    variants = {
        "llama-gqa-untied": ("llama", False, {}),
        "llama-tied": ("llama", True, {}),
        "qwen2-bias": ("qwen2", False, {}),
        "mistral": ("mistral", True, {}),
        "llama3-rope": (
            "llama",
            False,
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),
    }
    return {
        name: make_tiny_checkpoint(tmp_path_factory.mktemp(name), family, tie, **extra)
        for name, (family, tie, extra) in variants.items()
    }


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """`family_checkpoint(name, **config_changes)`: a tiny checkpoint of a tests/parity.py FAMILY_VARIANTS entry."""
    from parity import FAMILY_VARIANTS

    def build(name: str, **changes):
        family, tie, overrides = FAMILY_VARIANTS[name]
        return make_tiny_checkpoint(tmp_path_factory.mktemp(name), family, tie, **{**overrides, **changes})

    return build


@pytest.fixture(scope="session")
def default_engine():
    """One Engine on the default model (SmolLM2-135M-Instruct) for every end-to-end test that needs it."""
    from radixrt import Engine

    with Engine() as engine:
        yield engine
