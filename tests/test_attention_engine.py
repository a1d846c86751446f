"""Through the whole engine, the attention backend never changes a float32 greedy output.

The prompts exercise every path the kernels have: decode over cached prefixes, prefill chunks
that start mid-page on top of a radix-cache hit, page size 1, and a head_dim-64 model with
three query heads per KV head (the default model's shape, the kernels' vector path).
"""

from __future__ import annotations

import random

import pytest
from conftest import make_tiny_checkpoint

from radixrt import Engine, _native

GREEDY = {"max_new_tokens": 20, "min_new_tokens": 20, "temperature": 0}


def prompts() -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(3, 300) for _ in range(45)]
    own = [[rng.randrange(3, 300) for _ in range(rng.randrange(1, 50))] for _ in range(8)]
    return own[:4] + [shared + p for p in own[4:]] + [shared[:20]]


@pytest.fixture(scope="module")
def gqa3_llama(tmp_path_factory):
    """head_dim 64, 6 query heads over 2 KV heads."""
    folder = tmp_path_factory.mktemp("tiny-gqa3")
    return make_tiny_checkpoint(folder, "llama", hidden_size=384, num_attention_heads=6, num_key_value_heads=2)


@pytest.mark.parametrize(
    "model, options",
    [("tiny_llama", {"page_size": 1}), ("gqa3_llama", {"page_size": 4, "chunked_prefill_size": 16})],
    ids=["tiny-page1", "gqa3-page4-chunked"],
)
def test_native_greedy_equals_torch(request, model, options):
    if _native.load() is None:
        pytest.skip(f"native kernels unavailable: {_native.load_error()}")
    folder = str(request.getfixturevalue(model))
    outputs = {}
    for backend in ("torch", "native"):
        with Engine(folder, attention_backend=backend, **options) as engine:
            assert engine.worker.runner.backend.name == backend
            first = engine.generate(input_ids=prompts(), sampling_params=GREEDY)
            again = engine.generate(input_ids=prompts(), sampling_params=GREEDY)  # served from the prefix cache
            stats = engine.stats()
        assert [o.token_ids for o in again] == [o.token_ids for o in first]
        assert stats.hit_tokens > 0
        outputs[backend] = [o.token_ids for o in first]
    assert outputs["native"] == outputs["torch"]
