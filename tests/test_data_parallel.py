"""`radixrt serve --dp 2`: two replicas behind sglang-router (server/data_parallel.py), on 127.0.0.1.

- A replica's command line gives back every option the server was given (`--tp` included), less the
  ones the supervisor sets itself (address, port, threads, API key).
- Through the router: the official `openai` client's chat and streaming (the same greedy text), an
  API key enforced end to end, the native endpoints the router calls (`/flush_cache` on every
  replica, `/get_model_info`, `/generate`); `response_format` on the default model (slow).
- cache_aware keeps a conversation on one replica: every turn lands where the first did, and its
  `cached_tokens` grow turn after turn.
- A replica killed mid-run: no request sent after the kill fails, the supervisor logs the death
  and restarts it, the router's `/workers` shows it down and then up again; SIGTERM then stops
  the supervisor, the router, the replicas and their workers (no process of the tree is left).

The end-to-end tests need sglang-router (the test extra installs it) and skip without it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from server_process import KEY, running_server

from radixrt.engine_args import add_engine_args
from radixrt.server.data_parallel import replica_flags
from radixrt.server.launch import add_server_args

needs_router = pytest.mark.skipif(
    importlib.util.find_spec("sglang_router") is None,
    reason="sglang-router is not installed: pip install -e '.[router]' (the test extra includes it)",
)
DP_ARGS = ("--dp", "2", "--num-threads", "2", "--page-size", "4", "--chunked-prefill-size", "64")
PAGE = 4
AUTH = {"Authorization": f"Bearer {KEY}"}


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    add_engine_args(parser)
    return parser


def test_replica_command_line_carries_every_option_but_the_supervisors():
    parser = serve_parser()
    given = ["--dp", "2", "--tp", "2", "--model", "/m", "--host", "0.0.0.0", "--port", "8000", "--api-key", "k",
             "--num-threads", "8", "--allowed-hosts", "a", "b", "--disable-jump-forward", "--kv-memory-gb", "2.5",
             "--drain-timeout", "5", "--router-policy", "round_robin"]  # fmt: skip
    args = parser.parse_args(given)
    skip = {"host", "port", "api_key", "allowed_hosts", "num_threads", "dp_size", "router_policy"}
    flags = replica_flags(parser, args, skip)
    assert flags[flags.index("--tp") + 1] == "2" and "--disable-jump-forward" in flags
    assert not {"--dp", "--host", "--port", "--api-key", "--num-threads", "--allowed-hosts"} & set(flags)
    back = vars(parser.parse_args(flags))
    for dest, value in vars(args).items():
        assert back[dest] == (parser.get_default(dest) if dest in skip else value), dest


# ----- end to end, through the router --------------------------------------------------------


@pytest.fixture(scope="module")
def dp_server(tiny_llama):
    with running_server(*DP_ARGS, model=tiny_llama) as server:
        yield server


def replica_urls(server) -> list[str]:
    return sorted(w["url"] for w in server.get("/workers").json()["workers"])


def finished(url: str) -> int:
    return httpx.get(url + "/stats", headers=AUTH, timeout=10).json()["num_finished"]


@needs_router
def test_openai_client_chat_and_stream_through_router(dp_server):
    from openai import AuthenticationError, OpenAI

    client = OpenAI(base_url=dp_server.url + "/v1", api_key=KEY)
    model = client.models.list().data[0].id
    ask = dict(model=model, messages=[{"role": "user", "content": "w7 w8 w9"}], max_tokens=8, temperature=0,
               extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.chat.completions.create(**ask)
    assert whole.usage.completion_tokens == 8 and whole.choices[0].message.content
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=dp_server.url + "/v1", api_key="wrong").chat.completions.create(**ask)
    assert httpx.post(dp_server.url + "/v1/chat/completions", json=ask).status_code == 401


@needs_router
def test_native_endpoints_through_router(dp_server):
    info = dp_server.get("/get_model_info").json()
    assert info["served_model_name"] == info["model_path"]  # SGLang names a model by its path
    out = dp_server.post("/generate", {"text": "w1 w2 w3", "sampling_params": {"max_new_tokens": 3}})
    assert out.status_code == 200 and len(out.json()["output_ids"]) == 3
    flushed = dp_server.post("/flush_cache")
    assert flushed.status_code == 200 and flushed.json()["workers_flushed"] == 2


@needs_router
def test_conversation_stays_on_one_replica(dp_server):
    """Two conversations, turns interleaved: each turn lands on its conversation's replica and finds
    the whole history before it in that replica's cache."""
    urls = replica_urls(dp_server)
    talks = {name: [{"role": "system", "content": system}] for name, system in
             (("a", "w10 w11 w12 w13 w14 w15 w16"), ("b", "w20 w21 w22 w23 w24 w25 w26"))}  # fmt: skip
    served: dict[str, set[str]] = {"a": set(), "b": set()}
    prompt: dict[str, list[int]] = {"a": [], "b": []}
    cached: dict[str, list[int]] = {"a": [], "b": []}
    for turn in range(4):
        for name, messages in talks.items():
            messages.append({"role": "user", "content": f"w{30 + turn} w{40 + turn} w{50 + turn}"})
            before = [finished(u) for u in urls]
            body = {"model": "default", "messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            r = dp_server.post("/v1/chat/completions", body).json()
            after = [finished(u) for u in urls]
            served[name] |= {u for u, b, a in zip(urls, before, after) if a > b}
            messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
            prompt[name].append(r["usage"]["prompt_tokens"])
            cached[name].append(r["usage"]["prompt_tokens_details"]["cached_tokens"])
    for name in talks:
        assert len(served[name]) == 1, (name, served)
        for k in range(1, 4):  # the previous turn's prompt and reply, but for its last page
            assert cached[name][k] > cached[name][k - 1] and cached[name][k] >= prompt[name][k - 1] - PAGE, cached


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def replica_pid(supervisor: int, url: str) -> int:
    port = url.rsplit(":", 1)[1]
    for pid in descendants(supervisor):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"serve" in argv and argv[argv.index(b"--port") + 1].decode() == port:
            return pid
    raise LookupError(url)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.2)


@needs_router
def test_dead_replica_is_routed_around_restarted_and_sigterm_stops_everything(tiny_llama):
    with running_server(*DP_ARGS, model=tiny_llama) as server:
        urls = replica_urls(server)
        pids = [replica_pid(server.proc.pid, u) for u in urls]
        if len(os.sched_getaffinity(0)) >= 2:  # one core each
            shares = [os.sched_getaffinity(p) for p in pids]
            assert len(shares[0]) == len(shares[1]) == 1 and not shares[0] & shares[1]

        killed_at = []

        def ask(i: int) -> tuple[float, int]:
            start = time.monotonic()
            body = {"text": f"w{i % 300} w{(7 * i) % 300} w{(13 * i) % 300}", "sampling_params": {"max_new_tokens": 8}}
            try:
                return start, httpx.post(server.url + "/generate", json=body, headers=AUTH, timeout=60).status_code
            except httpx.HTTPError:
                return start, -1

        def load(offset: int) -> list[tuple[float, int]]:
            results = []
            for i in range(offset, offset + 60, 2):
                results.append(ask(i))
                if i == offset + 10 and offset == 0:
                    os.kill(pids[1], signal.SIGKILL)
                    killed_at.append(time.monotonic())
            return results

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = [r for part in pool.map(load, (0, 1)) for r in part]
        later = [code for start, code in results if start > killed_at[0]]
        assert len(later) > 30 and set(later) == {200}, later

        port = urls[1].rsplit(":", 1)[1]

        def health_of(url: str) -> bool:
            return {w["url"]: w["is_healthy"] for w in server.get("/workers").json()["workers"]}[url]

        wait_for(lambda: f"on port {port} (pid {pids[1]}) was killed by SIGKILL" in Path(server.log).read_text(), 5,
                 "the death logged")  # fmt: skip
        # The router may have marked it down and seen the new replica come up before this point.
        log = Path(server.log).read_text
        wait_for(lambda: not health_of(urls[1]) or "is healthy again" in log(), 15, "the router marks it down")
        wait_for(lambda: "is healthy again" in log(), 120, "the restarted replica healthy")
        wait_for(lambda: health_of(urls[1]), 30, "the router marks it up")
        assert replica_pid(server.proc.pid, urls[1]) != pids[1]

        tree = descendants(server.proc.pid) | {server.proc.pid}
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
        wait_for(lambda: not any(map(alive, tree)), 15, f"all of {sorted(tree)} gone")


@pytest.mark.slow
@needs_router
def test_response_format_through_router():
    """The default model (a real tokenizer) behind the router: JSON under a schema."""
    from openai import OpenAI

    properties = {"city": {"type": "string", "maxLength": 20}, "country": {"enum": ["France", "Italy"]}}
    schema = {"type": "object", "required": ["city", "country"], "properties": properties}
    with running_server("--dp", "2", "--num-threads", "2") as server:
        client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
        r = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "Where is the Eiffel Tower? Answer in JSON."}],
            max_tokens=40,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
        )
        place = json.loads(r.choices[0].message.content)
        assert set(place) == {"city", "country"} and place["country"] in ("France", "Italy")
