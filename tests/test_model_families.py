"""Qwen3, Gemma 2/3, Phi-3/4, sliding windows and every rope kind match transformers.

Each variant is a tiny random-weight checkpoint built from the family's transformers config class,
checked like the older families (test_model_parity.py): prompt logits within float32 tolerance
and, through the Engine with chunked prefill, prompt log-probs and 32 greedy tokens, on both CPU
attention backends. Windows (8 keys) are shorter than the prompts, and weights are drawn wider
than transformers' default (std 0.1) so attention is peaked: `test_each_feature_moves_the_logits`
shows that transformers itself gives different logits without each feature, so the parity tests
would catch a forward that left it out.
"""

from __future__ import annotations

import pytest
import torch
from parity import (
    BACKENDS,
    FAMILY_VARIANTS,
    GEMMA3_ROPE,
    PROMPT_IDS,
    ROPES,
    check_engine_greedy,
    check_prompt_logits,
    hf_model,
    longrope,
)

from radixrt.attention.base import ForwardBatch
from radixrt.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from radixrt.model.rope import RotaryEmbedding

VARIANTS = FAMILY_VARIANTS
# transformers' Phi-3 generate drops its KV cache and recomputes the whole sequence with long factors
# when it first passes original_max_position_embeddings; we keep the cache (model/rope.py). So Phi-3
# longrope is compared with a prompt already past it, prefilled in one chunk: long factors throughout.
GREEDY_OVERRIDES = {"phi4-mini-longrope": dict(prompt=list(range(3, 23)), chunk=32)}
# What each variant adds, switched off: transformers must then give other logits.
FEATURES_OFF = [
    ("qwen3-sliding-layers", dict(use_sliding_window=False)),
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(sliding_window=4096)),
    ("gemma2", dict(query_pre_attn_scalar=16)),
    ("gemma3", dict(sliding_window=4096)),
    ("gemma3", dict(rope_parameters={**GEMMA3_ROPE, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    ("phi3-window", dict(sliding_window=None)),
    ("phi4-mini-longrope", dict(partial_rotary_factor=1.0, rope_scaling=longrope(16))),
    ("phi4-mini-longrope", dict(rope_scaling=None)),
    ("mistral-window", dict(sliding_window=None)),
    *[(name, dict(rope_scaling=None)) for name in ROPES],
]


@pytest.fixture(scope="module")
def folders(family_checkpoint):
    return {name: family_checkpoint(name) for name in VARIANTS}


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prompt_logits_match_transformers(folders, variant, backend_name):
    check_prompt_logits(folders[variant], backend_name)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_greedy_matches_transformers(folders, variant, backend_name):
    check_engine_greedy(folders[variant], backend_name, **GREEDY_OVERRIDES.get(variant, {}))


@pytest.mark.parametrize("variant, off", FEATURES_OFF, ids=[f"{v}-{'-'.join(off)}" for v, off in FEATURES_OFF])
def test_each_feature_moves_the_logits(folders, family_checkpoint, variant, off):
    with torch.no_grad():
        with_it = hf_model(folders[variant])(torch.tensor([PROMPT_IDS])).logits[0]
        without = hf_model(family_checkpoint(variant, **off))(torch.tensor([PROMPT_IDS])).logits[0]
    assert (with_it - without).abs().max() > 100 * 1e-4  # 100x the parity tolerance


def test_windows_and_caps_come_from_the_config(folders):
    gemma2 = ModelConfig.from_hf_dict(hf_model(folders["gemma2"]).config.to_dict())
    assert gemma2.layer_types == ("sliding_attention", "full_attention")
    assert [gemma2.layer_window(i) for i in range(2)] == [8, None]
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap, gemma2.attn_scale) == (1.0, 5.0, 24**-0.5)
    qwen3 = ModelConfig.from_hf_dict(hf_model(folders["qwen3-sliding-layers"]).config.to_dict())
    assert [qwen3.layer_window(i) for i in range(2)] == [None, 8]  # layers from max_window_layers on slide
    mistral = ModelConfig.from_hf_dict(hf_model(folders["mistral-window"]).config.to_dict())
    assert [mistral.layer_window(i) for i in range(2)] == [8, 8]


def test_linear_and_dynamic_rope_serve_factor_times_the_context(folders):
    """As SGLang: their max_position_embeddings is the pre-scaling length."""
    assert ModelConfig.from_hf_dict(hf_model(folders["rope-dynamic"]).config.to_dict()).max_position_embeddings == 64
    assert ModelConfig.from_hf_dict(hf_model(folders["rope-yarn"]).config.to_dict()).max_position_embeddings == 64


# --- rope: our cos/sin against transformers' rotary module ------------------------------------------


def rope_batch(seq_lens: list[int], new: list[int]) -> ForwardBatch:
    """A step holding the last `new[b]` tokens of each request; only the rope's fields are real."""
    qo = [0]
    positions: list[int] = []
    for n, k in zip(seq_lens, new):
        qo.append(qo[-1] + k)
        positions += range(n - k, n)
    return ForwardBatch(
        input_ids=torch.zeros(qo[-1], dtype=torch.int64), positions=torch.tensor(positions), out_slots=torch.zeros(0),
        qo_indptr=qo, prefix_lens=[n - k for n, k in zip(seq_lens, new)], seq_lens=seq_lens, page_tables=[],
        logits_indices=torch.zeros(0), page_size=1,
    )  # fmt: skip


@pytest.mark.parametrize("variant", [*ROPES, "phi4-mini-longrope"])
def test_rope_matches_transformers_token_by_token(folders, variant):
    """A 10-token prompt in one step, then one token at a time past the threshold, as generate runs."""
    hf = hf_model(folders[variant])
    theirs = hf.model.rotary_emb  # stateful for dynamic and longrope: fed the same sequence of calls
    ours = RotaryEmbedding(ModelConfig.from_hf_dict(hf.config.to_dict()), "full_attention")
    steps = [(10, 10)] + [(n, 1) for n in range(11, 41)]
    for seq_len, new in steps:
        cos, sin = ours(rope_batch([seq_len], [new]))
        ref_cos, ref_sin = theirs(torch.zeros(1), torch.arange(seq_len - new, seq_len)[None])
        half = cos.shape[-1]
        torch.testing.assert_close(cos, ref_cos[0, :, :half], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sin, ref_sin[0, :, :half], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["rope-dynamic", "rope-longrope"])
def test_length_dependent_rope_uses_each_requests_own_length(folders, variant):
    """Batched with a long request, a short one gets the rope it would get alone."""
    ours = RotaryEmbedding(ModelConfig.from_hf_dict(hf_model(folders[variant]).config.to_dict()), "full_attention")
    together = ours(rope_batch([12, 40], [3, 1]))[0]
    long_alone = ours(rope_batch([40], [1]))[0]
    assert torch.equal(together[:3], ours(rope_batch([12], [3]))[0])
    assert torch.equal(together[3:], long_alone)
    unscaled = (39 * ours.inv_freq).cos() * ours.attention_scaling
    assert not torch.allclose(long_alone[0], unscaled)  # past the threshold its frequencies did change


def test_unsupported_architecture_fails_in_one_line():
    with pytest.raises(UnsupportedModelError) as info:
        ModelConfig.from_hf_dict({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"})
    message = str(info.value)
    assert "\n" not in message and "Gemma3ForConditionalGeneration" in message
    assert all(arch in message for arch in SUPPORTED_ARCHITECTURES)

