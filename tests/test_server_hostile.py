"""Hostile and careless clients (issue 14): one request must never stall the others, and a bad one
fails alone with a 4xx naming what is wrong.

The invariants: whatever a request carries (its size, its prompt, its messages, its stop strings),
a cheap request sent meanwhile is answered as quickly as ever; an input over a limit is refused
before any work, with the field named; text that is not Unicode is a 400, not a 500; tenants with
different cache salts never share cached prompt pages, on every route; a tiny temperature samples
greedily; max_tokens must fit the context; state-changing and cross-site requests are refused; a
shutdown that outlasts --drain-timeout ends streams with an error event, not a cut connection.

The "quickly as ever" tests time cheap requests beside the hostile one with a generous bound (a
second, where they take < 0.1 s, and took 2-40 s before): they test behaviour, not speed.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from server_process import KEY, TINY_ARGS, running_server

from radixrt.frontend.detokenizer import IncrementalDetokenizer
from radixrt.frontend.stop_strings import StopStrings

HEADERS = {"Authorization": f"Bearer {KEY}"}
JSON_HEADERS = {**HEADERS, "Content-Type": "application/json"}
PROMPT_BUDGET = 3_000_000  # --max-prompt-chars: big enough that the tiny tokenizer takes seconds
CHEAP_BOUND = 1.0  # seconds: a cheap request takes < 0.1 s here; beside these hostile ones it took 2-40 s


@pytest.fixture(scope="module")
def server(tiny_llama):
    with running_server(*TINY_ARGS, "--max-prompt-chars", str(PROMPT_BUDGET), model=tiny_llama) as s:
        yield s


def post(server, path: str, body=None, content: bytes | None = None, headers=JSON_HEADERS, timeout: float = 120):
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=timeout)


def cheap_latencies_beside(server, hostile: Callable[[], httpx.Response]) -> tuple[httpx.Response, list[float]]:
    """Run `hostile` on a thread; meanwhile send cheap completions one after another. Returns the
    hostile response and the cheap requests' latencies (at least one)."""
    result: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: result.append(hostile()))
    thread.start()
    latencies = []
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=120) as client:
        while thread.is_alive() or not latencies:
            start = time.monotonic()
            r = client.post("/v1/completions", json={"prompt": "w5 w6", "max_tokens": 2, "ignore_eos": True})
            assert r.status_code == 200, r.text
            latencies.append(time.monotonic() - start)
    thread.join()
    return result[0], latencies


def assert_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    return error


# ----- 1. request size; tokenizing and templates off the event loop -----------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_is_413_at_once(server, chunked):
    body = json.dumps({"messages": [{"role": "user", "content": "w5 " * 17_000_000}]}).encode()  # 50 MB

    def send() -> httpx.Response:
        content = (body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)) if chunked else body
        return post(server, "/v1/chat/completions", content=content)

    r, latencies = cheap_latencies_beside(server, send)
    assert_error(r, 413, None)
    assert "--max-request-bytes" in r.json()["error"]["message"]
    assert max(latencies) < CHEAP_BOUND


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/generate", "/v1/tokenize"])
def test_tokenizing_a_long_prompt_does_not_hold_other_requests(server, route):
    text = "w5 " * 950_000  # 2.85 M characters: seconds of tokenizing, inside the budget
    body = {
        "/v1/completions": {"prompt": text, "max_tokens": 1},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": text}], "max_tokens": 1},
        "/generate": {"text": text},
        "/v1/tokenize": {"prompt": text},
    }[route]
    r, latencies = cheap_latencies_beside(server, lambda: post(server, route, body))
    if route == "/v1/tokenize":
        assert r.status_code == 200 and r.json()["count"] == 950_000
    else:  # tokenized, then refused: 950,000 tokens do not fit a 512-token context
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert len(latencies) >= 3 and max(latencies) < CHEAP_BOUND, latencies


def test_many_messages_and_tools_do_not_hold_other_requests(server):
    messages = [{"role": "user", "content": "w5 " * 250}] * 3800  # 2.9 M characters once rendered
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}} for i in range(100)]
    body = {"messages": messages, "tools": tools, "max_tokens": 1}
    r, latencies = cheap_latencies_beside(server, lambda: post(server, "/v1/chat/completions", body))
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert max(latencies) < CHEAP_BOUND


def test_prompt_over_the_character_budget_is_refused_before_tokenizing(server):
    start = time.monotonic()
    r = post(server, "/v1/completions", {"prompt": "w5 " * (PROMPT_BUDGET // 3 + 1), "max_tokens": 1})
    assert_error(r, 400, "prompt")
    assert "characters" in r.json()["error"]["message"] and time.monotonic() - start < CHEAP_BOUND
    body = {"messages": [{"role": "user", "content": "w5 " * 1_000_001}]}
    assert_error(post(server, "/v1/chat/completions", body), 400, "messages")


PART = {"type": "text", "text": "w5"}


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}] * 4097}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [PART] * 257}]}, "messages.0.content"),
        ("/v1/completions", {"prompt": ["w5"] * 257}, "prompt"),
        ("/v1/completions", {"prompt": [1] + ["w5"] * 100_000}, "prompt.1"),
        ("/generate", {"input_ids": [[5]] * 257}, "input_ids"),
        ("/v1/detokenize", {"tokens": [5] * 100_000}, "tokens"),
    ],
    ids=["messages", "content-parts", "prompts", "mixed-list", "input-id-lists", "detokenize"],
)
def test_oversized_lists_are_400_naming_the_field(server, path, body, param):
    start = time.monotonic()
    assert_error(post(server, path, body), 400, param)
    assert time.monotonic() - start < CHEAP_BOUND


# ----- 3. stop strings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/generate", {"text": "w5", "sampling_params": {"stop": ["x" * 200] * 20_000}}, "sampling_params.stop"),
        ("/generate", {"text": "w5", "sampling_params": {"stop": ["x" * 257]}}, "sampling_params.stop"),
        ("/generate", {"text": "w", "sampling_params": {"stop_token_ids": [5] * 17}}, "sampling_params.stop_token_ids"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "stop": ["x"] * 10_000}, "stop"),
        ("/v1/completions", {"prompt": "w5", "stop": "x" * 257}, "stop"),
    ],
    ids=["generate-count", "generate-length", "stop-token-ids", "chat-count", "completions-length"],
)
def test_stop_strings_over_the_limits_are_400_at_once(server, path, body, param):
    r, latencies = cheap_latencies_beside(server, lambda: post(server, path, body))
    error = assert_error(r, 400, param)
    assert "--max-stop" in error["message"]
    assert max(latencies) < CHEAP_BOUND


def test_a_batch_with_different_stops_per_prompt_is_bounded_as_one(server):
    stops = [[f"{i:03d}" + "x" * 252] * 16 for i in range(2)]  # two full lists: twice the budget
    body = {"text": ["w5", "w6"], "sampling_params": [{"stop": s} for s in stops]}
    assert_error(post(server, "/generate", body), 400, "sampling_params.stop")


def test_longest_stop_lists_on_many_streams_do_not_hold_other_requests(server):
    stops = [f"{i:02d}" + "".join(random.Random(i).choices("w0123456789 ", k=254)) for i in range(16)]

    def streams() -> httpx.Response:
        with httpx.Client(base_url=server.url, headers=HEADERS, timeout=120) as client:
            body = {"prompt": "w5", "max_tokens": 400, "ignore_eos": True, "stop": stops, "n": 16, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as r:
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and len(events) > 16 * 20
            return r

    r, latencies = cheap_latencies_beside(server, streams)
    assert r.status_code == 200 and max(latencies) < CHEAP_BOUND


class _Chars:
    """A tokenizer whose token ids are characters: the detokenizer's text is exactly what is fed."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def _reference(stops: list[str], chunks: list[str]) -> tuple[list[str], str | None]:
    """What the detokenizer must hand out, from the definition: cut at the earliest stop string
    (the first listed wins a tie); hold back the longest tail that may still become one."""
    text, emitted, out = "", 0, []
    for chunk in chunks:
        text += chunk
        found = [(i, k) for k, s in enumerate(stops) if (i := text.find(s)) >= 0]
        if found:
            i, k = min(found)
            out.append(text[emitted:i])
            return out, stops[k]
        hold = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        out.append(text[emitted : max(emitted, len(text) - hold)])
        emitted = max(emitted, len(text) - hold)
    return out, None


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.text("abc", min_size=1, max_size=4), max_size=5),
    st.lists(st.text("abc", min_size=1, max_size=3), max_size=12),
)
def test_stop_automaton_matches_the_definition(stops, chunks):
    detok = IncrementalDetokenizer(_Chars(), stops)
    got = [detok.add(list(map(ord, chunk))) for chunk in chunks[: len(_reference(stops, chunks)[0])]]
    assert (got, detok.matched_stop) == _reference(stops, chunks)


def test_stop_check_per_token_does_not_grow_with_the_stop_strings():
    """16 stops of 256 characters cost per token what one short stop costs (not 16 x 256 x more)."""
    rng = random.Random(0)
    text = "".join(rng.choices("abcdefgh ", k=60_000))
    many = ["".join(rng.choices("abcdefgh ", k=256)) for _ in range(16)]

    def seconds(stops: list[str]) -> float:
        detok = IncrementalDetokenizer(_Chars(), StopStrings(stops))
        start = time.perf_counter()
        for i in range(0, len(text), 4):
            detok.add(list(map(ord, text[i : i + 4])))
        return time.perf_counter() - start

    one = min(seconds(["zz"]) for _ in range(3))
    assert min(seconds(many) for _ in range(3)) < 4 * one + 0.05


# ----- 4. text that is not Unicode ---------------------------------------------------------------

LONE = "w5 \ud800 w6"


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
        ("/v1/completions", {"prompt": LONE, "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": "w5", "max_tokens": 2, "regex": "a\ud800"}, "regex"),
        ("/v1/completions", {"prompt": "w5", "max_tokens": 2, "stop": ["\udc00"]}, "stop.0"),
        ("/generate", {"text": LONE}, "text"),
        ("/generate", {"text": "w5", "sampling_params": {"stop": ["x\udfff"]}}, "sampling_params.stop.0"),
        ("/v1/tokenize", {"prompt": LONE}, "prompt"),
    ],
    ids=["chat", "completions", "regex", "stop", "generate", "generate-stop", "tokenize"],
)
def test_lone_surrogate_is_400_naming_the_field_and_the_connection_lives_on(server, path, body, param):
    with httpx.Client(base_url=server.url, headers=JSON_HEADERS, timeout=60) as client:
        assert_error(client.post(path, content=json.dumps(body).encode()), 400, param)
        again = client.post("/v1/completions", json={"prompt": "w5 \U0001f600", "max_tokens": 2})  # a pair is fine
        assert again.status_code == 200


# ----- 5. cache_salt on every route ----------------------------------------------------------------

@pytest.mark.parametrize("route", ["chat", "completions", "generate"])
def test_cache_salt_isolates_tenants_on_every_route(server, route):
    offset = 10 + 100 * ["chat", "completions", "generate"].index(route)
    system = " ".join(f"w{offset + i}" for i in range(80))  # 80 tokens no other test sends: 20 pages of 4

    def cached(salt: str | None) -> int:
        if route == "chat":
            body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "w5"}]}
            r = post(server, "/v1/chat/completions", dict(body, max_tokens=1, cache_salt=salt))
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        if route == "completions":
            r = post(server, "/v1/completions", {"prompt": system + " w5", "max_tokens": 1, "cache_salt": salt})
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        body = {"text": system + " w5", "sampling_params": {"max_new_tokens": 1}, "cache_salt": salt}
        return post(server, "/generate", body).json()["meta_info"]["cached_tokens"]

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0  # the same prompt, another tenant: nothing shared
    assert cached(None) == 0  # nor with requests that carry no salt
    assert cached("tenant-a") >= 76  # the same tenant again: its own pages
    assert cached(None) >= 76


# ----- 6, 7. temperature, max_tokens -------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 1e-8])
def test_tiny_positive_temperature_samples_greedily(server, temperature):
    def ids(t: float) -> list[int]:
        body = {"text": "w5 w6 w7", "sampling_params": {"max_new_tokens": 8, "temperature": t, "ignore_eos": True}}
        return post(server, "/generate", body).json()["output_ids"]

    assert ids(temperature) == ids(0.0)


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 600}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "w5"}], "max_completion_tokens": 600},
            "max_completion_tokens",
        ),
        ("/v1/completions", {"prompt": "w5", "max_tokens": 512}, "max_tokens"),
        ("/generate", {"text": "w5", "sampling_params": {"max_new_tokens": 512}}, "sampling_params.max_new_tokens"),
    ],
    ids=["chat-max_tokens", "chat-max_completion_tokens", "completions", "generate"],
)
def test_max_tokens_beyond_the_context_is_400(server, path, body, param):
    error = assert_error(post(server, path, body), 400, param)
    assert "context of 512 tokens" in error["message"]


def test_max_tokens_that_fit_and_defaults_still_work(server):
    r = post(server, "/v1/completions", {"prompt": "w5", "max_tokens": 511, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 511  # prompt 1 + 511 = the whole context
    long = " ".join(["w5"] * 505)  # unset max_tokens: OpenAI's 16, capped by the 7 tokens left
    r = post(server, "/v1/completions", {"prompt": long, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 7


# ----- 8. cross-site requests ---------------------------------------------------------------------


def test_state_changing_routes_are_post_only(server):
    assert_error(httpx.get(server.url + "/flush_cache", headers=HEADERS), 405, None)
    assert httpx.post(server.url + "/flush_cache", headers=HEADERS).status_code == 200  # no body: fine


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""])
def test_json_routes_refuse_other_content_types(server, content_type):
    body = b'{"prompt": "w5", "max_tokens": 1}'
    r = post(server, "/v1/completions", content=body, headers={**HEADERS, "Content-Type": content_type})
    assert_error(r, 415, None)
    utf8 = {**HEADERS, "Content-Type": "application/json; charset=utf-8"}
    assert post(server, "/v1/completions", content=body, headers=utf8).status_code == 200


@pytest.mark.parametrize(
    "host, status",
    [("evil.example", 400), ("evil.example:99", 400), ("127.0.0.1.nip.io", 400), ("localhost", 200), ("[::1]:80", 200)],
)
def test_host_header_is_checked_on_loopback(server, host, status):
    r = httpx.get(server.url + "/v1/models", headers={**HEADERS, "Host": host})
    assert r.status_code == status
    if status == 400:
        assert r.json()["error"]["code"] == "host_not_allowed"


# ----- 9. messages; shutdown --------------------------------------------------------------------


def test_validation_message_comes_from_the_branch_that_matched(server):
    error = assert_error(post(server, "/v1/completions", {"prompt": [5, 6, "w7"]}), 400, "prompt.2")
    assert "integer" in error["message"]  # the token-id branch, not "Input should be a valid string"
    body = {"messages": [{"role": "user", "content": "w5"}], "stop": ["x"] * 10_000}
    error = assert_error(post(server, "/v1/chat/completions", body), 400, "stop")
    assert "at most 16" in error["message"]


def test_drain_timeout_ends_streams_with_an_error_event(tiny_llama):
    """And --allowed-hosts: the names given are answered, the loopback defaults no longer are."""
    args = ("--drain-timeout", "0.3", "--allowed-hosts", "rt.internal", "127.0.0.1")
    with running_server(*TINY_ARGS, *args, model=tiny_llama) as s:
        assert httpx.get(s.url + "/v1/models", headers={**HEADERS, "Host": "rt.internal:8000"}).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={**HEADERS, "Host": "localhost"}).status_code == 400
        ends: list[list[str]] = []
        started = threading.Barrier(17, timeout=60)

        def stream(i: int) -> None:
            body = {"prompt": f"w{5 + i}", "max_tokens": 511, "ignore_eos": True, "stream": True}
            events = []
            try:
                with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=HEADERS, timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if len(events) == 2:
                                started.wait()
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                events.append(f"client error after {len(events)} events: {exc!r}")
            ends.append(events[-2:])

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        started.wait()
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert len(ends) == 16 and all(e[-1] == "[DONE]" for e in ends), ends
        cut = [e for e in ends if "error" in e[0]]
        assert cut, "the streams all finished before the drain timeout: nothing was tested"
        for error_event, done in cut:
            assert json.loads(error_event)["error"]["type"] == "unavailable_error" and done == "[DONE]"
        assert s.proc.wait(30) == 0
