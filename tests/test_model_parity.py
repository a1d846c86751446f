"""Our paged forward matches Hugging Face transformers on tiny random-weight models."""

from __future__ import annotations

import pytest
import torch

from radixrt import Engine
from radixrt.attention.base import ForwardBatch
from radixrt.attention.torch_ref import TorchAttention
from radixrt.cache.page_pool import KVPool
from radixrt.config import EngineConfig
from radixrt.worker import load_model

VARIANTS = ["llama-gqa-untied", "llama-tied", "qwen2-bias", "mistral", "llama3-rope"]


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def ours(folder, dtype="float32"):
    return load_model(EngineConfig(dtype=dtype), folder)


def prefill_logits(model, ids: list[int], page_size: int = 4, shuffle_pages: bool = True) -> torch.Tensor:
    """All-position logits of one sequence through the paged path (pages deliberately out of order)."""
    cfg = model.config
    pool = KVPool(cfg, num_pages=64, page_size=page_size, dtype=next(model.parameters()).dtype)
    n_pages = -(-len(ids) // page_size)
    pages = pool.allocator.alloc(64)
    if shuffle_pages:
        pages = pages[::-1]
    table = pages[:n_pages]
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
    return model(batch, pool, TorchAttention())


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_logits_match_transformers(tiny_checkpoints, variant):
    folder = tiny_checkpoints[variant]
    ids = torch.randint(3, 300, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = hf_model(folder)(torch.tensor([ids])).logits[0]
    got = prefill_logits(ours(folder), ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_transformers(tiny_checkpoints, variant):
    folder = tiny_checkpoints[variant]
    prompt = [5, 17, 42, 99, 7, 3, 250]
    with torch.no_grad():
        ref = hf_model(folder).generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32, pad_token_id=0
        )[0, len(prompt):].tolist()
    with Engine(str(folder), page_size=4, kv_memory_gb=0.01) as engine:
        out = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 32, "min_new_tokens": 32, "temperature": 0})
    assert out.token_ids == ref


def test_bfloat16_close_to_float32(tiny_checkpoints):
    folder = tiny_checkpoints["llama-gqa-untied"]
    ids = list(range(3, 40))
    fp32 = prefill_logits(ours(folder), ids)
    bf16 = prefill_logits(ours(folder, "bfloat16"), ids)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0.1, atol=0.1)
