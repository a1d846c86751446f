"""Our paged forward matches Hugging Face transformers on tiny random-weight models.

Two checks per checkpoint, each through both CPU attention backends (torch reference, native):
  - the logits of a 37-token prompt, run as one step over deliberately shuffled pages, equal
    transformers' within float32 tolerance;
  - through the whole Engine (paged KV, chunked prefill in chunks of 8, prefix cache, decode), the
    prompt's log-probs equal transformers' and 32 greedy tokens are the ones transformers generates.
The other families (Qwen3, Gemma 2/3, Phi-3, sliding windows, every rope kind) reuse these checks
in test_model_families.py.
"""

from __future__ import annotations

import pytest
import torch
from parity import (
    BACKENDS,
    PARITY_VARIANTS,
    backend,
    check_engine_greedy,
    check_prompt_logits,
    ours,
    prefill_logits,
)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("variant", PARITY_VARIANTS)
def test_prompt_logits_match_transformers(tiny_checkpoints, variant, backend_name):
    check_prompt_logits(tiny_checkpoints[variant], backend_name)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("variant", PARITY_VARIANTS)
def test_engine_greedy_matches_transformers(tiny_checkpoints, variant, backend_name):
    check_engine_greedy(tiny_checkpoints[variant], backend_name)


def test_bfloat16_close_to_float32(tiny_checkpoints):
    folder = tiny_checkpoints["llama-gqa-untied"]
    ids = list(range(3, 40))
    fp32 = prefill_logits(ours(folder), ids, backend("torch"))
    bf16 = prefill_logits(ours(folder, torch.bfloat16), ids, backend("torch"))
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0.1, atol=0.1)
