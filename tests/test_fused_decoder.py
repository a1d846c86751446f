"""The fused CPU decoder (csrc/decoder.cpp) computes what the eager forward computes.

Same model, same steps, two KV pools: a step of two prompts (chunks of 13 and 7 tokens on
shuffled pages) and then a decode step for both, through `FusedDecoder.forward` and through
`LlamaForCausalLM.forward` on the native backend. float32: logits within 1e-5, K/V written to the
pools equal. bfloat16 and quantized (int8, int4) weights: logits within a bf16 tolerance. Then
through the Engine: 32 greedy tokens equal with the fused decoder on and off.
"""

from __future__ import annotations

import pytest
import torch
from parity import FAMILY_VARIANTS, PARITY_VARIANTS, ours

from radixrt import Engine, _native
from radixrt.attention.base import ForwardBatch
from radixrt.attention.native import NativeAttention
from radixrt.cache.page_pool import KVPool
from radixrt.model.fused import FusedDecoder, unsupported
from radixrt.model.quant import quantize_linears

PAGE = 4
PROMPTS = [list(range(3, 16)), [40, 41, 42, 43, 44, 45, 46]]  # 13 and 7 tokens


@pytest.fixture(scope="module")
def ops():
    ops = _native.load()
    if ops is None:
        pytest.skip(f"native kernels unavailable: {_native.load_error()}")
    return ops


def steps() -> list[ForwardBatch]:
    """Two prefills, then one decode token each; pages handed out back to front."""
    tables = [[15, 9, 3, 12], [6, 1]]
    batches = []
    for prefix, new in (([0, 0], [13, 7]), ([13, 7], [1, 1])):
        ids, positions, slots = [], [], []
        for r, (start, n) in enumerate(zip(prefix, new)):
            tokens = (PROMPTS[r] + [7])[start : start + n]
            ids += tokens
            positions += range(start, start + n)
            slots += [tables[r][p // PAGE] * PAGE + p % PAGE for p in range(start, start + n)]
        qo = [0, new[0], new[0] + new[1]]
        batches.append(
            ForwardBatch(
                input_ids=torch.tensor(ids),
                positions=torch.tensor(positions),
                out_slots=torch.tensor(slots),
                qo_indptr=qo,
                prefix_lens=prefix,
                seq_lens=[p + n for p, n in zip(prefix, new)],
                page_tables=tables,
                logits_indices=torch.arange(qo[-1]),
                page_size=PAGE,
            )
        )
    return batches


def both_ways(model, ops) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dtype = next(model.parameters()).dtype
    eager_pool, fused_pool = (KVPool(model.config, 16, PAGE, dtype) for _ in range(2))
    fused = FusedDecoder(model, fused_pool, ops)
    backend = NativeAttention(ops)
    out = [(fused.forward(b), model(b, eager_pool, backend)) for b in steps()]
    for layer in range(model.config.num_layers):
        torch.testing.assert_close(fused_pool.k[layer], eager_pool.k[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_pool.v[layer], eager_pool.v[layer], rtol=1e-5, atol=1e-5)
    return out


def covered(folder) -> bool:
    return unsupported(ours(folder)) is None


@pytest.mark.parametrize("variant", PARITY_VARIANTS)
def test_float32_logits_equal_the_eager_forward(tiny_checkpoints, ops, variant):
    for fused, eager in both_ways(ours(tiny_checkpoints[variant]), ops):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [v for v in FAMILY_VARIANTS if not v.startswith(("gemma", "rope-"))])
def test_other_families_equal_the_eager_forward(family_checkpoint, ops, variant):
    model = ours(family_checkpoint(variant))
    assert unsupported(model) is None
    for fused, eager in both_ways(model, ops):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_gemma_is_left_to_the_eager_forward(family_checkpoint):
    assert unsupported(ours(family_checkpoint("gemma2"))) == "Gemma's norms"


@pytest.mark.parametrize("method", [None, "int8", "int4"])
def test_bfloat16_and_quantized_logits_stay_close(tiny_checkpoints, ops, method):
    model = ours(tiny_checkpoints["qwen2-bias"], torch.bfloat16)
    if method:
        quantize_linears(model, method)
    for fused, eager in both_ways(model, ops):
        torch.testing.assert_close(fused, eager, rtol=2e-2, atol=2e-2)  # bf16 rounding of sums in another order
        assert (fused.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("variant", ["llama-gqa-untied", "qwen2-bias"])
def test_engine_greedy_is_the_same_with_the_fused_decoder(tiny_checkpoints, ops, variant):
    folder = str(tiny_checkpoints[variant])
    params = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}
    prompts = [[5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 31, 8], list(range(20, 45))]
    outputs = []
    for disable in (False, True):
        with Engine(folder, page_size=PAGE, chunked_prefill_size=8, disable_fused_decoder=disable) as engine:
            assert (engine.worker.runner.fused is None) == disable
            outputs.append([o.token_ids for o in engine.generate(input_ids=prompts, sampling_params=params)])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_prefill_chunks_that_sample_nothing(tiny_checkpoints, ops, method):
    """A 25-token prompt in chunks of 8: the first chunks need no logits rows (the LM head gets 0 rows)."""
    with Engine(str(tiny_checkpoints["llama-tied"]), page_size=PAGE, chunked_prefill_size=8, quantization=method) as e:
        out = e.generate(input_ids=list(range(20, 45)), sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert len(out.token_ids) == 4
