"""`radixrt serve` with no --model: the default SmolLM2-135M-Instruct answers real questions over HTTP."""

from __future__ import annotations

import openai
import pytest
from server_process import KEY, running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with running_server("--kv-memory-gb", "0.25") as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_chat_answers_and_second_turn_hits_cache(client, server):
    model = client.models.list().data[0].id
    assert model == "SmolLM2-135M-Instruct"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    first = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    answer = first.choices[0].message.content
    assert "Paris" in answer and first.choices[0].finish_reason == "stop"
    counted = server.post("/v1/tokenize", {"messages": messages}).json()["count"]
    assert first.usage.prompt_tokens == counted

    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answer

    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Germany?"}]
    second = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    assert "Berlin" in second.choices[0].message.content
    # The first turn (system prompt, question, answer) comes from the cache, in whole 16-token pages.
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 16 * 16 > 0
