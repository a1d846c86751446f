"""A user moving from SGLang or vLLM: their launch command, request fields, endpoints and metrics.

The server under test is started with a typical SGLang command line (`--model-path`,
`--context-length`, `--mem-fraction-static`, `--log-level` after `serve`, `--enable-metrics`) and
driven with the official openai client. The invariants: every flag and field an SGLang or vLLM
user sends is honoured with the effect those servers document, or refused with a 400 (or a
one-line command-line error) that names it; SGLang's dashboards find their metrics.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from server_process import KEY, ROOT, TINY_ARGS, running_server

HEADERS = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"temperature": 0, "ignore_eos": True}
CONTEXT = 256
# The tiny model's template, plus a variable a request can set through chat_template_kwargs.
TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% if enable_thinking is defined and not enable_thinking %}"
    "w9 {% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(tiny_llama, template_file):
    sglang_flags = ("--model-path", str(tiny_llama), "--context-length", str(CONTEXT), "--mem-fraction-static", "0.02",
                    "--log-level", "info", "--enable-metrics", "--random-seed", "7", "--tp-size", "1", "--dp-size", "1",
                    "--dtype", "float", "--chat-template", str(template_file))  # fmt: skip
    with running_server(*sglang_flags, "--max-total-tokens", "2048", *TINY_ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def generate(server, body: dict) -> dict:
    r = server.post("/generate", body)
    assert r.status_code == 200, r.text
    return r.json()


def refused(response: httpx.Response, param: str, *words: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error["message"]
    return error["message"]


# ----- launching -----------------------------------------------------------------------------------


def test_sglang_launch_command_and_the_openai_client(server, client, tiny_llama):
    [card] = client.models.list().data
    assert card.id == str(tiny_llama)  # --served-model-name defaults to the model path, as in SGLang
    assert client.models.retrieve(card.id).id == card.id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    for model in (card.id, "default"):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "w5 w6"}], max_tokens=4,
                                           temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
        assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    info = server.get("/server_info").json()
    assert info["context_length"] == CONTEXT and info["mem_fraction_static"] == 0.02 and info["random_seed"] == 7
    assert info["max_total_num_tokens"] == 2048 and info["max_req_input_len"] == CONTEXT - 1
    assert 0 < info["config"]["kv_memory_gb"] < 1  # sized from 2% of the free RAM, then capped by the tokens
    assert info["dtype"] == "float32" and info["chat_template"] and info["internal_states"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "radixrt.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)  # fmt: skip


def test_unknown_flag_is_one_line_naming_the_nearest():
    out = run_cli("serve", "--model_path", "x")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "radixrt serve: error: unknown flag --model_path (did you mean --model-path?)"
    out = run_cli("serve", "--dtype", "fp8")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "--dtype" in out.stderr


def test_bad_chat_template_fails_at_start_in_one_line(tiny_llama):
    out = run_cli("serve", "--model-path", str(tiny_llama), "--chat-template", "no-such-template")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "neither a file nor a built-in template (chatml, llama-3-instruct)" in out.stderr


def test_help_says_how_mem_fraction_relates_to_kv_memory():
    text = " ".join(run_cli("serve", "--help").stdout.split())
    assert "--mem-fraction-static" in text and "it replaces --kv-memory-gb" in text
    for flag in ("--model-path", "--context-length", "--random-seed", "--tp-size", "--dp-size", "--tool-call-parser",
                 "--reasoning-parser", "--served-model-name", "--quantization", "--log-level"):  # fmt: skip
        assert flag in text, flag


# ----- request fields ------------------------------------------------------------------------------


def test_logit_bias_bans_and_forces_tokens(client, server):
    prompt = "w5 w6 w7 w8"
    plain = client.completions.create(model="default", prompt=prompt, max_tokens=4, temperature=0)
    first = server.post("/v1/tokenize", {"prompt": plain.choices[0].text.split()[0]}).json()["tokens"][0]
    banned = client.completions.create(model="default", prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias={str(first): -100})  # fmt: skip
    assert banned.choices[0].text.split()[0] != plain.choices[0].text.split()[0]
    forced = client.completions.create(model="default", prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias={"17": 100})  # fmt: skip
    assert forced.choices[0].text.split() == ["w14"] * 4  # token 17 is the word w14
    out = generate(server, {"text": prompt, "sampling_params": {"max_new_tokens": 3, "temperature": 0.8,
                                                                 "logit_bias": {"17": 100}}})  # fmt: skip
    assert out["output_ids"] == [17, 17, 17]  # sampled too, not only greedy
    refused(server.post("/v1/completions", {"prompt": prompt, "logit_bias": {"17": 101}}), "logit_bias.17", "100")
    refused(server.post("/v1/completions", {"prompt": prompt, "logit_bias": {"9999": 1}}), "logit_bias", "vocabulary")


def test_stop_regex_and_keeping_the_stop_text(client, server):
    prompt = "w5 w6 w7 w8"
    words = client.completions.create(model="default", prompt=prompt, max_tokens=6, **{"temperature": 0}).choices[0]
    words = words.text.split()
    pattern = re.escape(words[1]) + r" w\d+"  # the second word and the one after it
    cut = client.completions.create(model="default", prompt=prompt, max_tokens=6, temperature=0,
                                    extra_body={"stop_regex": pattern})  # fmt: skip
    assert cut.choices[0].text == words[0] + " " and cut.choices[0].finish_reason == "stop"
    keep = {"stop_regex": [pattern], "include_stop_str_in_output": True}
    kept = client.completions.create(model="default", prompt=prompt, max_tokens=6, temperature=0, extra_body=keep)
    assert kept.choices[0].text == " ".join(words[:3])
    streamed = client.completions.create(model="default", prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                         extra_body={"stop_regex": pattern})  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text
    sglang = {"max_new_tokens": 6, "temperature": 0, "stop_regex": pattern, "no_stop_trim": True}
    out = generate(server, {"text": prompt, "sampling_params": sglang})
    assert out["text"] == " ".join(words[:3])
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    stop = client.completions.create(model="default", prompt=prompt, max_tokens=6, temperature=0, stop=[words[1]],
                                     extra_body={"include_stop_str_in_output": True})  # fmt: skip
    assert stop.choices[0].text == " ".join(words[:2])
    refused(server.post("/v1/completions", {"prompt": prompt, "stop_regex": "a*"}), "stop_regex", "empty string")
    refused(server.post("/v1/completions", {"prompt": prompt, "stop_regex": "(unclosed"}), "stop_regex", "compile")
    refused(server.post("/v1/completions", {"prompt": prompt, "stop_regex": ["w1"] * 17}), "stop_regex", "at most 16")


def test_chat_template_kwargs_reach_the_template(client, server):
    messages = [{"role": "user", "content": "w5"}]
    plain = server.post("/v1/tokenize", {"messages": messages}).json()["tokens"]
    off = server.post("/v1/tokenize", {"messages": messages, "chat_template_kwargs": {"enable_thinking": False}})
    assert off.json()["tokens"] == plain + [12]  # the template wrote w9 (token 12) for it
    a = client.chat.completions.create(model="default", messages=messages, max_tokens=2, temperature=0)
    b = client.chat.completions.create(model="default", messages=messages, max_tokens=2, temperature=0,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
    assert b.usage.prompt_tokens == a.usage.prompt_tokens + 1
    body = {"messages": messages, "chat_template_kwargs": {"tokenize": True}}
    refused(server.post("/v1/chat/completions", body), "chat_template_kwargs", "tokenize")


def test_continue_final_message_continues_the_last_message(client, server):
    messages = [{"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6 w7"}]
    closed = server.post("/v1/tokenize", {"messages": messages, "add_generation_prompt": False}).json()["tokens"]
    open_ = server.post("/v1/tokenize", {"messages": messages, "continue_final_message": True}).json()["tokens"]
    assert closed[-1] == 2 and open_[-2:] == [9, 10] and closed[: len(open_)] == open_  # no </s> after "w6 w7"
    r = client.chat.completions.create(model="default", messages=messages, max_tokens=3, temperature=0,
                                       extra_body={"continue_final_message": True, "ignore_eos": True})  # fmt: skip
    assert r.usage.prompt_tokens == len(open_)
    body = {"messages": messages, "continue_final_message": True, "add_generation_prompt": True}
    refused(server.post("/v1/chat/completions", body), "add_generation_prompt", "continue_final_message")


def test_cache_salt_keeps_tenants_apart(server):
    body = {"prompt": "w40 w41 w42 w43 w44 w45 w46 w47 w48 w49", "max_tokens": 1, "temperature": 0}
    cached = [server.post("/v1/completions", dict(body, cache_salt=salt)).json()["usage"]["prompt_tokens_details"]
              for salt in ("tenant-a", "tenant-a", "tenant-b")]  # fmt: skip
    assert cached[1]["cached_tokens"] > 0 and cached[2]["cached_tokens"] == 0


def test_generate_n_sampling_seed_and_custom_params(server):
    body = {"text": "w5 w6", "sampling_params": {"max_new_tokens": 5, "temperature": 1.0, "n": 2, "sampling_seed": 3}}
    first, second = generate(server, body), generate(server, body)
    assert [o["text"] for o in first] == [o["text"] for o in second] and first[0]["text"] != first[1]["text"]
    body = {"text": "w5 w6", "sampling_params": {"max_new_tokens": 5, "temperature": 1.0, "seed": 3}}
    seeded = generate(server, body)
    assert seeded["text"] == first[0]["text"]  # sampling_seed is seed; sample j uses seed + j
    bad = {"text": "w5", "sampling_params": {"custom_params": {"k": 1}}}
    refused(server.post("/generate", bad), "sampling_params.custom_params", "logit processors")
    refused(server.post("/generate", {"text": "w5", "image_data": "x.png"}), "image_data", "text-only")


def test_unknown_fields_are_refused_by_name(client, server):
    messages = [{"role": "user", "content": "w5"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=messages, extra_body={"logit_biass": {"5": 1}})
    assert e.value.body["param"] == "logit_biass" and "did you mean 'logit_bias'" in e.value.body["message"]
    for field, value, words in (("use_beam_search", True, "beam search"), ("functions", [{"name": "f"}], "tools"),
                                ("prompt_logprobs", 1, "logprob_start_len")):  # fmt: skip
        refused(server.post("/v1/chat/completions", {"messages": messages, field: value}), field, *words.split())
    part = {"type": "image_url", "image_url": {"url": "x"}}
    refused(server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [part]}]}),
            "messages.0.content.0.image_url", "text-only")  # fmt: skip
    # Null is absent, and an option at its default changes nothing: both are accepted.
    ok = {"messages": [{"role": "user", "content": "w5", "refusal": None}], "max_tokens": 1, "store": False,
          "use_beam_search": False, "user": "u1", "metadata": {"k": "v"}, "seed": None}  # fmt: skip
    assert server.post("/v1/chat/completions", ok).status_code == 200


# ----- request ids and endpoints -------------------------------------------------------------------


def test_request_id_is_echoed_and_aborts_the_request(client, server):
    messages = [{"role": "user", "content": "w5"}]
    raw = client.chat.completions.with_raw_response.create(
        model="default", messages=messages, max_tokens=2, extra_headers={"X-Request-Id": "r-1"}
    )
    assert raw.headers["x-request-id"] == "r-1" and raw.parse().id == "chatcmpl-r-1"
    assert server.get("/v1/models").headers.get("x-request-id") is None
    echoed = httpx.get(server.url + "/v1/models", headers={**HEADERS, "X-Request-Id": "any"})
    assert echoed.headers["x-request-id"] == "any"
    # The worker is paused (SIGSTOP) while the request runs, so the flush and the abort reach it in
    # that order, both before the request could finish: no race with the tiny model's speed.
    worker = server.get("/get_server_info").json()["worker_pid"]
    text = " ".join(f"w{i}" for i in range(60, 72))  # whole pages, which the running request locks
    body = {"text": text, "rid": "long-1", "stream": True,
            "sampling_params": {"max_new_tokens": CONTEXT - 16, "ignore_eos": True, "temperature": 0}}  # fmt: skip
    with httpx.stream("POST", server.url + "/generate", json=body, headers=HEADERS, timeout=60) as r:
        assert r.headers["x-request-id"] == "long-1"
        lines = (line for line in r.iter_lines() if line.startswith("data: {"))
        events = [json.loads(next(lines)[6:])]  # it runs
        os.kill(worker, signal.SIGSTOP)
        try:
            refused(server.post("/generate", dict(body, stream=False)), "rid", "already in use")
            with ThreadPoolExecutor(1) as pool:
                flush = pool.submit(server.post, "/flush_cache")
                time.sleep(0.5)  # its message is on the worker's socket before the abort's
                assert server.post("/abort_request", {"rid": "long-1"}).json() == {"aborted": 1}
                os.kill(worker, signal.SIGCONT)
                assert flush.result().status_code == 400  # SGLang's answer while requests run
        finally:
            os.kill(worker, signal.SIGCONT)
        events += [json.loads(line[6:]) for line in lines]
    last = events[-1]["meta_info"]
    assert last["id"] == "long-1" and last["finish_reason"] == {"type": "abort"}
    assert last["completion_tokens"] < CONTEXT - 16
    assert generate(server, {"text": "w5", "rid": "long-1", "sampling_params": {"max_new_tokens": 1}})  # free again
    too_long = {**HEADERS, "X-Request-Id": "x" * 300}
    refused(httpx.post(server.url + "/v1/completions", json={"prompt": "w5"}, headers=too_long), "X-Request-Id")


def test_health_generate_and_metrics_need_no_key(server):
    assert httpx.get(server.url + "/health_generate").status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401
    text = httpx.get(server.url + "/metrics").text
    label = f'{{model_name="{server.get("/v1/models").json()["data"][0]["id"]}"}}'
    for name, kind in (("sglang:prompt_tokens", "counter"), ("sglang:generation_tokens", "counter"),
                       ("sglang:cached_tokens", "counter"), ("sglang:num_requests", "counter"),
                       ("sglang:num_aborted_requests", "counter"), ("sglang:num_retracted_requests", "counter"),
                       ("sglang:time_to_first_token_seconds", "histogram"),
                       ("sglang:inter_token_latency_seconds", "histogram"),
                       ("sglang:e2e_request_latency_seconds", "histogram"), ("sglang:num_running_reqs", "gauge"),
                       ("sglang:num_queue_reqs", "gauge"), ("sglang:token_usage", "gauge"),
                       ("sglang:cache_hit_rate", "gauge"), ("sglang:max_total_num_tokens", "gauge")):  # fmt: skip
        family = f"{name}_total" if kind == "counter" else name  # as SGLang's own exposition spells it
        assert f"# TYPE {family} {kind}" in text, name
        assert f"{family}_count{label}" in text if kind == "histogram" else f"{family}{label}" in text, name
    assert f"sglang:max_total_num_tokens{label} 2048.0" in text
    buckets = re.findall(r'^sglang:time_to_first_token_seconds_bucket\{.*le="([^"]+)".*\}', text, re.M)
    assert buckets[:3] == ["0.1", "0.2", "0.4"]  # SGLang's buckets


def test_tokenize_detokenize_at_vllm_paths(server):
    out = server.post("/tokenize", {"prompt": "w5 w6", "return_token_strs": True}).json()
    assert out == {"tokens": [8, 9], "count": 2, "max_model_len": CONTEXT, "token_strs": ["w5", "w6"]}
    assert server.post("/detokenize", {"tokens": [8, 9]}).json() == {"prompt": "w5 w6"}


def test_model_and_server_info_in_sglang_shapes(server, tiny_llama):
    for path in ("/get_model_info", "/model_info"):
        info = server.get(path).json()
        assert info["model_path"] == info["tokenizer_path"] == str(tiny_llama)
        assert info["is_generation"] is True and "preferred_sampling_params" in info and info["weight_version"]
    for path in ("/get_server_info", "/server_info"):
        info = server.get(path).json()
        assert info["model_path"] == str(tiny_llama) and info["version"] and info["worker_pid"]


def test_get_load_for_the_router_and_its_placeholder_model_name(server, client):
    (load,) = server.get("/get_load").json()  # sglang-router's load-aware policies poll it
    assert load["dp_rank"] == 0 and load["num_reqs"] >= 0 and load["num_tokens"] >= 0
    # the router sends "unknown" for a request that names no model
    out = client.chat.completions.create(model="unknown", messages=[{"role": "user", "content": "w5"}], max_tokens=2)
    assert out.choices[0].message.content is not None


def test_flush_cache_answers_as_sglang(server):
    r = server.post("/flush_cache")
    assert r.status_code == 200 and r.text.startswith("Cache flushed.")
    assert httpx.get(server.url + "/flush_cache", headers=HEADERS).status_code == 405  # POST only (docs/server.md)
