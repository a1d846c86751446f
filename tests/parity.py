"""What the model parity tests share: the reference (transformers), our model built from the model
package alone, and the two checks every family goes through (test_model_parity.py for Llama, Qwen2
and Mistral; test_model_families.py for Qwen3, Gemma 2/3, Phi-3/4, windows and every rope kind):
  - the logits of a 37-token prompt, run as one step over deliberately shuffled pages, equal
    transformers' within float32 tolerance;
  - through the whole Engine (paged KV, chunked prefill, prefix cache, decode), the prompt's
    log-probs equal transformers' and 32 greedy tokens are the ones transformers generates.
"""

from __future__ import annotations

import pytest
import torch

from radixrt import Engine
from radixrt.attention import make_attention_backend
from radixrt.attention.base import ForwardBatch
from radixrt.cache.page_pool import KVPool
from radixrt.model.llama import LlamaForCausalLM
from radixrt.model.loader import iter_weights, read_model_config

PARITY_VARIANTS = ["llama-gqa-untied", "llama-tied", "qwen2-bias", "mistral", "llama3-rope"]
BACKENDS = ["torch", "native"]
PROMPT_IDS = torch.randint(3, 300, (37,), generator=torch.Generator().manual_seed(1)).tolist()
GREEDY_PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 31, 8]  # 12 tokens: two prefill chunks of 8 and 4
NEW_TOKENS = 32
LOGIT_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def ours(folder, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Our model for the checkpoint, built from the model package alone (no worker)."""
    model = LlamaForCausalLM(read_model_config(folder))
    model.load_weights(iter_weights(folder, dtype))
    return model.to(dtype).eval()


def backend(name: str):
    if name == "native":
        from radixrt import _native

        if _native.load() is None:
            pytest.skip(f"native kernels unavailable: {_native.load_error()}")
    return make_attention_backend(name, "cpu")


def prefill_logits(model, ids: list[int], attention, page_size: int = 4) -> torch.Tensor:
    """All-position logits of one sequence in one step, its pages deliberately out of order."""
    pool = KVPool(model.config, num_pages=64, page_size=page_size, dtype=next(model.parameters()).dtype)
    table = list(range(pool.num_pages))[::-1][: -(-len(ids) // page_size)]
    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.arange(len(ids)),
        out_slots=torch.tensor([table[i // page_size] * page_size + i % page_size for i in range(len(ids))]),
        qo_indptr=[0, len(ids)],
        prefix_lens=[0],
        seq_lens=[len(ids)],
        page_tables=[table],
        logits_indices=torch.arange(len(ids)),
        page_size=page_size,
    )
    return model(batch, pool, attention)


def check_prompt_logits(folder, backend_name: str) -> float:
    """Assert our prompt logits equal transformers'; return the largest difference."""
    with torch.no_grad():
        expected = hf_model(folder)(torch.tensor([PROMPT_IDS])).logits[0]
    got = prefill_logits(ours(folder), PROMPT_IDS, backend(backend_name))
    torch.testing.assert_close(got, expected, **LOGIT_TOLERANCE)
    return (got - expected).abs().max().item()


def check_engine_greedy(folder, backend_name: str, prompt: list[int] = GREEDY_PROMPT, chunk: int = 8) -> None:
    """Through Engine with chunked prefill: prompt log-probs close, and the same 32 greedy tokens."""
    backend(backend_name)  # skips when the native kernels are unavailable
    model = hf_model(folder)
    with torch.no_grad():
        lengths = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
        generated = model.generate(torch.tensor([prompt]), do_sample=False, pad_token_id=0, **lengths)
        ref = generated[0, len(prompt) :].tolist()
        logprobs = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    ref_prompt_logprobs = logprobs[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    params = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "temperature": 0, "prompt_logprobs": True}
    with Engine(
        str(folder), page_size=4, chunked_prefill_size=chunk, kv_memory_gb=0.01, attention_backend=backend_name
    ) as engine:
        out = engine.generate(input_ids=prompt, sampling_params=params)
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), ref_prompt_logprobs, **LOGIT_TOLERANCE)
    assert out.token_ids == ref


WIDE = {"initializer_range": 0.1}
GEMMA = dict(WIDE, sliding_window=8, query_pre_attn_scalar=24)
GEMMA3_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
}


def longrope(rotary_dim: int, original: int = 16) -> dict:
    """LongRoPE parameters with distinct short and long factors per rotary frequency."""
    half = rotary_dim // 2
    return {
        "rope_type": "longrope",
        "original_max_position_embeddings": original,
        "short_factor": [1.0 + 0.2 * i for i in range(half)],
        "long_factor": [2.0 + 1.5 * i for i in range(half)],
    }


# name -> (family, tied embeddings, config overrides)
FAMILIES = {
    "qwen3": ("qwen3", False, WIDE),
    "qwen3-sliding-layers": ("qwen3", True, dict(WIDE, use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "gemma2": ("gemma2", True, dict(GEMMA, attn_logit_softcapping=1.0, final_logit_softcapping=5.0)),
    "gemma3": ("gemma3", True, dict(GEMMA, num_hidden_layers=4, sliding_window_pattern=2, rope_parameters=GEMMA3_ROPE)),
    "phi3-window": ("phi3", False, dict(WIDE, sliding_window=8)),
    "phi4-mini-longrope": (
        "phi3",
        True,
        dict(
            WIDE,
            partial_rotary_factor=0.75,
            max_position_embeddings=64,
            original_max_position_embeddings=16,
            rope_scaling=longrope(12),
        ),
    ),  # fmt: skip
    "mistral-window": ("mistral", False, dict(WIDE, sliding_window=8)),
}
# Every rope kind on a tiny Llama (llama3 is in test_model_parity.py). dynamic and longrope change
# at 16 positions: the 37-token prompt logits pass it in one step, greedy decoding passes it token
# by token (the 12-token prompt stays under it: see model/rope.py on chunked prefill).
ROPES = {
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope-dynamic": dict(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
    "rope-yarn": dict(max_position_embeddings=64, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "rope-longrope": dict(max_position_embeddings=64, rope_scaling=longrope(16)),
}  # fmt: skip
FAMILY_VARIANTS = {**FAMILIES, **{name: ("llama", False, dict(WIDE, **extra)) for name, extra in ROPES.items()}}
