"""Constrained output and tool calls over HTTP: response_format, regex/choices extensions, tools.

Request validation and the server serving on run on the tiny model (its word-level tokenizer
can neither spell JSON nor build a grammar engine). Grammar errors, real JSON and tool calls
come from the default SmolLM2 model (slow): one server, short greedy requests.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from server_process import KEY, TINY_ARGS, running_server

MSG = [{"role": "user", "content": "w5 w6"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET", "PST"]}}, "required": ["tz"]},
    },
}
TYPO = {"type": "object", "properties": {"a": {"type": "strin"}}}  # compiles nowhere
BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": TYPO}}
BAD_TOOL = {"type": "function", "function": {"name": "f", "parameters": TYPO}}


def post(server, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)


def assert_400(r: httpx.Response, param: str) -> dict:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param or error["param"].startswith(param + "."), error
    return error


# ----- tiny model: validation and grammar errors ------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    with running_server(*TINY_ARGS, model=tiny_llama) as s:
        yield s


CHAT = "/v1/chat/completions"
BAD_REQUESTS = [
    # caught by the front end
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", False),
    (CHAT, {"response_format": {"type": "xml"}}, "response_format", False),
    (CHAT, {"json_schema": "{not json"}, "json_schema", False),
    (CHAT, {"regex": "w5", "guided_choice": ["w5"]}, "choices", False),
    (CHAT, {"response_format": {"type": "json_object"}, "regex": "w5"}, "regex", False),
    (CHAT, {"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools", False),
    (
        CHAT,
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools",
        False,
    ),
    (CHAT, {"tools": [WEATHER, WEATHER]}, "tools", False),
    (
        CHAT,
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
        False,
    ),
    (CHAT, {"tool_choice": "required"}, "tool_choice", False),
    (CHAT, {"tools": [WEATHER], "tool_choice": "required", "regex": "w5"}, "regex", False),
    ("/v1/completions", {"prompt": "w5", "guided_choice": []}, "guided_choice", False),
]
# Refused by the grammar compiler in the worker (default model).
COMPILE_ERRORS = [
    (CHAT, {"response_format": BAD_SCHEMA}, "response_format", True),
    (CHAT, {"response_format": BAD_SCHEMA, "stream": True}, "response_format", True),
    (CHAT, {"regex": "[0-9"}, "regex", True),
    (CHAT, {"guided_regex": "(a", "stream": True, "n": 2}, "regex", True),
    (CHAT, {"tools": [BAD_TOOL], "tool_choice": "required"}, "tools", True),
    ("/v1/completions", {"prompt": "w5", "ebnf": "root ::= undefined_rule", "stream": True}, "ebnf", True),
    ("/generate", {"text": "w5", "sampling_params": {"regex": "(("}}, "sampling_params.regex", True),
    (
        "/generate",
        {"text": "w5", "stream": True, "sampling_params": {"json_schema": json.dumps(TYPO)}},
        "sampling_params.json_schema",
        True,
    ),
]


def check_400(server, path, body, param, compiled):
    if path == CHAT:
        body = {"messages": MSG, "max_tokens": 4, **body}
    error = assert_400(post(server, path, body), param)
    if compiled:  # the compiler's message, prefixed with the request field
        assert error["message"].startswith(f"invalid {param}: ")


@pytest.mark.parametrize(
    "path,body,param,compiled", BAD_REQUESTS, ids=[f"{p}:{x[2]}:{i}" for i, (p, *x) in enumerate(BAD_REQUESTS)]
)
def test_bad_constraint_is_400(tiny, path, body, param, compiled):
    check_400(tiny, path, body, param, compiled)


def test_tiny_still_serving(tiny):
    """Tools with a template that has no tool convention give plain content; unconstrained
    requests still work after all the 400s."""
    r = post(
        tiny, CHAT, {"messages": MSG, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "tools": [WEATHER]}
    ).json()
    assert r["choices"][0]["message"]["content"] and "tool_calls" not in r["choices"][0]["message"]
    r = post(tiny, "/v1/completions", {"prompt": "w5", "max_tokens": 2, "temperature": 0, "ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 2


# ----- default model: real JSON and tool calls ---------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    with running_server("--kv-memory-gb", "0.25") as s:
        yield s


@pytest.fixture
def client(smol):
    return openai.OpenAI(base_url=smol.url + "/v1", api_key=KEY, max_retries=0, timeout=180)


def chat(client, content: str, max_tokens: int = 40, **kw):
    return client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        **kw,
    )


@pytest.mark.slow
def test_json_object_and_json_schema(client):
    question = 'Is the sky blue? Answer in JSON with a single key "answer" whose value is yes or no.'
    r = chat(client, question, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)

    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"enum": ["France", "Germany", "Italy"]},
        },
        "required": ["city", "country"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    r = chat(client, "Where is the Eiffel Tower? Answer in JSON.", response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


@pytest.mark.slow
def test_regex_extension_streamed(client):
    pattern = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    stream = chat(
        client, "When did the French Revolution start? Give the date.", stream=True, extra_body={"regex": pattern}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert re.fullmatch(pattern, text) and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_tool_choice_required_and_named(client):
    r = chat(client, "What is the weather in Paris?", tools=[WEATHER, TIME], tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])

    named = {"type": "function", "function": {"name": "get_time"}}
    chunks = list(chat(client, "What time is it in Berlin?", tools=[WEATHER, TIME], tool_choice=named, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    calls = [tc for d in deltas for tc in d.tool_calls or []]  # the call's first delta, then argument fragments
    assert calls[0].function.name == "get_time" and calls[0].id.startswith("call_")
    assert all(tc.index == 0 for tc in calls) and not any(tc.id or tc.function.name for tc in calls[1:])
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    jsonschema.validate(json.loads(arguments), TIME["function"]["parameters"])
    assert not "".join(d.content or "" for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.slow
def test_tool_choice_auto_smollm2_is_plain_content(client):
    r = chat(client, "Say hello.", max_tokens=8, tools=[WEATHER])
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


@pytest.mark.slow
@pytest.mark.parametrize(
    "path,body,param,compiled", COMPILE_ERRORS, ids=[f"{p}:{x[2]}:{i}" for i, (p, *x) in enumerate(COMPILE_ERRORS)]
)
def test_compile_error_is_400(smol, path, body, param, compiled):
    check_400(smol, path, body, param, compiled)


@pytest.mark.slow
def test_still_serving_after_errors(client, smol):
    r = chat(client, "What is the capital of France?", max_tokens=12)
    assert "Paris" in r.choices[0].message.content
    r = post(
        smol,
        "/v1/completions",
        {"prompt": "Is water wet? Answer:", "max_tokens": 4, "temperature": 0, "choices": [" yes", " no"]},
    )
    assert r.json()["choices"][0]["text"] in (" yes", " no")
