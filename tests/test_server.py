"""The HTTP server end to end: a live `radixrt serve` on 127.0.0.1 (tiny model), the real openai client.

The invariants: streamed and non-streamed greedy text agree; concurrency never changes a
greedy answer; a client that leaves frees its pages; every bad input is a 400 with an
OpenAI error body and the server keeps serving; a dead worker fails requests (never hangs
them) and comes back.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_process import KEY, TINY_ARGS, running_server, wait_healthy

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_llama):
    with running_server(*TINY_ARGS, model=tiny_llama) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(server):
    return server.get("/v1/models").json()["data"][0]["id"]


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(3, 300)}" for _ in range(n))


# ----- OpenAI endpoints ------------------------------------------------------------------------


def test_chat_stream_equals_non_stream(client, model_id):
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    full = client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, **GREEDY)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(
        client.chat.completions.create(
            model=model_id,
            messages=messages,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_chat_logprobs(client, model_id):
    r = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "w9"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        **GREEDY,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy picks the top one


def test_completions_prompt_forms(client, model_id, server):
    ids = server.post("/v1/tokenize", {"prompt": "w5 w6 w7"}).json()["tokens"]
    by_text = client.completions.create(model=model_id, prompt="w5 w6 w7", max_tokens=6, **GREEDY)
    by_ids = client.completions.create(model=model_id, prompt=ids, max_tokens=6, **GREEDY)
    assert by_text.choices[0].text == by_ids.choices[0].text and by_text.choices[0].text
    several = client.completions.create(model=model_id, prompt=["w5 w6 w7", "w8 w9"], max_tokens=6, **GREEDY)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == by_text.choices[0].text
    id_lists = client.completions.create(model=model_id, prompt=[ids, ids[:2]], max_tokens=6, **GREEDY)
    assert id_lists.choices[0].text == by_text.choices[0].text
    assert id_lists.usage.prompt_tokens == len(ids) + 2

    echoed = client.completions.create(model=model_id, prompt="w5 w6 w7", max_tokens=4, echo=True, logprobs=2, **GREEDY)
    c = echoed.choices[0]
    assert c.text.startswith("w5 w6 w7")
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])


def test_n_choices_seed_and_stop(client, model_id):
    kw = dict(model=model_id, prompt="w20 w21", max_tokens=8, n=3, temperature=1.0, seed=7)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert len(first.choices) == 3
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # choice i is seeded with seed + i

    # The n choices share the prompt: the later ones start from its cached pages.
    fresh = client.completions.create(model=model_id, prompt="w70 w71 w72 w73 w74 w75 w76 w77 w78", max_tokens=2, n=3)
    assert fresh.usage.prompt_tokens == 9 and fresh.usage.prompt_tokens_details.cached_tokens == 8

    greedy = client.completions.create(model=model_id, prompt="w20 w21", max_tokens=8, **GREEDY).choices[0].text
    stop_word = greedy.split()[2]
    stopped = client.completions.create(model=model_id, prompt="w20 w21", max_tokens=8, stop=[stop_word], **GREEDY)
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == greedy[: greedy.index(stop_word)]


def test_second_turn_reuses_cache(client, model_id):
    messages = [{"role": "system", "content": "w1 w2 w3 w4 w5 w6 w7 w8"}, {"role": "user", "content": "w30 w31 w32"}]
    first = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8, **GREEDY)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "w40 w41"},
    ]
    second = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8, **GREEDY)
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens // 2


def test_32_concurrent_streams_match_solo(client, model_id, server):
    rng = random.Random(1)
    prompts = [words(rng, rng.randrange(2, 30)) for _ in range(32)]
    solo = [
        client.completions.create(model=model_id, prompt=p, max_tokens=16, **GREEDY).choices[0].text for p in prompts
    ]

    async def one(aclient, prompt: str) -> str:
        stream = await aclient.completions.create(model=model_id, prompt=prompt, max_tokens=16, stream=True, **GREEDY)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_at_once() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        return await asyncio.gather(*(one(aclient, p) for p in prompts))

    assert asyncio.run(all_at_once()) == solo
    s = server.wait_idle()
    assert s["used_pages"] == 0 and s["protected_pages"] == 0


# ----- native endpoints ------------------------------------------------------------------------


def test_generate_shape_and_prompt_logprobs(server):
    r = server.post("/generate", {"text": "w5 w6 w7", "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    body = r.json()
    assert r.status_code == 200 and set(body) == {"text", "output_ids", "meta_info"}
    meta = body["meta_info"]
    assert len(body["output_ids"]) == meta["completion_tokens"] == 4
    assert meta["finish_reason"] == {"type": "length", "length": 4} and meta["prompt_tokens"] == 3

    batch = server.post("/generate", {"input_ids": [[8, 9, 10], [11, 12]], "sampling_params": {"max_new_tokens": 2}})
    assert [len(b["output_ids"]) for b in batch.json()] == [2, 2]

    # Scoring a continuation, as the DSL's select does: no new tokens, prompt log-probs from a start position.
    ids = [8, 9, 10, 11, 12, 13]
    scored = server.post(
        "/generate",
        {"input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": 2},
    ).json()["meta_info"]
    inputs = scored["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == ids[2:] and all(lp <= 0 for lp, _, _ in inputs)
    echoed = server.post("/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    assert [lp for lp, _, _ in inputs] == pytest.approx(
        echoed["choices"][0]["logprobs"]["token_logprobs"][2:], abs=1e-4
    )

    with httpx.stream(
        "POST",
        server.url + "/generate",
        json={"text": "w5", "sampling_params": {"max_new_tokens": 5, "temperature": 0}, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert len(last["output_ids"]) == 5 and last["meta_info"]["finish_reason"]["type"] == "length"


def test_tokenize_detokenize_models_info(server, model_id):
    toks = server.post("/v1/tokenize", {"prompt": "w5 w6"}).json()
    assert toks["tokens"] == [8, 9] and toks["count"] == 2 and toks["max_model_len"] == 512
    assert server.post("/v1/detokenize", {"tokens": [8, 9]}).json() == {"prompt": "w5 w6"}
    chat = server.post("/v1/tokenize", {"messages": [{"role": "user", "content": "w5"}]}).json()
    assert chat["count"] > 2
    info = server.get("/get_server_info").json()
    assert info["model"] == model_id and info["worker_pid"] and info["stats"]["total_pages"] > 0


def test_metrics_and_flush(server, client, model_id):
    client.completions.create(model=model_id, prompt="w5 w6 w7 w8 w9", max_tokens=3, **GREEDY)
    text = server.get("/metrics").text
    for name in (
        "radixrt_requests_total{",
        "sglang:prompt_tokens_total{",
        "sglang:generation_tokens_total{",
        "sglang:cached_tokens_total{",
        "sglang:cache_hit_rate{",
        "sglang:num_queue_reqs{",
        "sglang:num_running_reqs{",
        "radixrt_kv_pages{",
        "sglang:time_to_first_token_seconds_bucket{",
        "sglang:inter_token_latency_seconds_bucket{",
    ):
        assert name in text
    assert server.post("/flush_cache").status_code == 200
    s = server.stats()
    assert s["cached_pages"] == 0 and s["free_pages"] == s["total_pages"]


# ----- robustness ------------------------------------------------------------------------------


def aborted(server) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith("radixrt_requests_total{") and 'finish_reason="abort"' in line:
            return float(line.split()[-1])
    return 0.0


def test_client_disconnect_aborts_and_frees_pages(server):
    before = aborted(server)
    body = {"prompt": "w5 w6", "max_tokens": 500, "ignore_eos": True}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=dict(body, stream=True), headers={"Authorization": f"Bearer {KEY}"}
    ) as resp:
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)
    # Hang up on a non-streaming request mid-generation. The tiny model may finish 500 tokens
    # before the client gives up (~0.1 s with the fused decoder); then try again (a finished
    # request is not an abort).
    for _ in range(10):
        try:
            server.post("/v1/completions", body, timeout=0.03)
        except httpx.ReadTimeout:
            break
    else:
        pytest.fail("could not disconnect before the request finished")
    s = server.wait_idle()
    assert s["num_running"] == 0 and s["used_pages"] == 0 and s["protected_pages"] == 0
    assert s["free_pages"] + s["cached_pages"] == s["total_pages"]
    assert aborted(server) == before + 2  # both ended by the disconnect, not by finishing


LONG = " ".join(["w5"] * 600)
BAD_INPUTS = [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"model": "gpt-17", "messages": [{"role": "user", "content": "w5"}]}, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "top_logprobs": 21}, "top_logprobs"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "w5"}], "presence_penalty": 3},
        "presence_penalty",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "stop": [""]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "seed": 2**70}, "seed"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2, "min_tokens": 5},
        "min_tokens",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "w5"}], "response_format": {"type": "json_schema"}},
        "response_format",
    ),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": LONG}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [5, 99999]}, "prompt"),
    ("/v1/completions", {"prompt": "w5", "suffix": "w6"}, "suffix"),
    ("/v1/completions", {"prompt": "w5", "temperature": "hot"}, "temperature"),
    ("/generate", {"text": "w5", "input_ids": [5]}, "text"),
    ("/generate", {"text": "w5", "sampling_params": {"bogus": 1}}, "sampling_params.bogus"),
    ("/generate", {"text": "w5", "sampling_params": {"max_new_tokens": -1}}, "sampling_params.max_new_tokens"),
    ("/generate", {"text": "w5", "sampling_params": {"top_p": "x"}}, "sampling_params.top_p"),
    ("/generate", {"input_ids": [5, 99999]}, "input_ids"),
    ("/v1/tokenize", {}, "prompt"),
    ("/v1/detokenize", {"tokens": [99999]}, "tokens"),
]


@pytest.mark.parametrize("path,body,param", BAD_INPUTS, ids=[f"{p}:{param}" for p, _, param in BAD_INPUTS])
def test_bad_input_is_400(server, path, body, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else None
    r = httpx.post(server.url + path, content=content, json=None if content else body, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param or (param and error["param"].startswith(param + "."))


def test_still_serving_after_bad_inputs(client, model_id):
    r = client.completions.create(model=model_id, prompt="w5", max_tokens=2, **GREEDY)
    assert r.usage.completion_tokens == 2


def test_model_default_is_accepted_as_in_sglang(client):
    r = client.completions.create(model="default", prompt="w5", max_tokens=2, **GREEDY)
    assert r.usage.completion_tokens == 2


def test_api_key(server, model_id):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    r = httpx.post(server.url + "/generate", json={"text": "w5"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_openapi_schema_fuzz_has_no_5xx(tiny_llama, tmp_path):
    """schemathesis over the published schema, bounded: every answer is < 500.

    Its own server with a 48-token context, so fuzzed requests (n up to 16, max_tokens
    up to the context) stay cheap.
    """
    st = Path(sys.executable).parent / "st"
    if not st.exists():
        pytest.skip("schemathesis is not installed")
    with running_server(*TINY_ARGS, "--max-context-len", "48", model=tiny_llama) as server:
        cmd = [str(st), "run", server.url + "/openapi.json", "-H", f"Authorization: Bearer {KEY}"]
        cmd += ["--checks", "not_a_server_error", "--phases", "examples,fuzzing", "-n", "10", "--seed", "1"]
        cmd += ["--no-shrink", "--generation-database", "none", "--request-timeout", "60", "-w", "1", "--no-color"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=400)
        assert r.returncode == 0, r.stdout[-4000:]
        assert httpx.get(server.url + "/health").status_code == 200


def test_worker_killed_mid_stream_fails_then_recovers(server, client, model_id):
    """Last in this file: it restarts the module server's worker."""
    pid = server.get("/get_server_info").json()["worker_pid"]
    stream = client.completions.create(model=model_id, prompt="w5", max_tokens=400, stream=True, **GREEDY)
    started = time.monotonic()
    with pytest.raises(openai.APIError, match="worker process died"):
        for i, _ in enumerate(stream):
            if i == 2:
                os.kill(pid, signal.SIGKILL)
    assert time.monotonic() - started < 30
    assert httpx.get(server.url + "/health").status_code == 503  # the restart takes seconds
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=model_id, prompt="w5", max_tokens=2)
    assert info.value.status_code == 503
    wait_healthy(server.url, timeout=120)
    r = client.completions.create(model=model_id, prompt="w5", max_tokens=3, **GREEDY)
    assert r.usage.completion_tokens == 3
    info = server.get("/get_server_info").json()
    assert info["worker_restarts"] == 1 and info["worker_pid"] != pid
