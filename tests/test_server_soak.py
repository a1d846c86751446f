"""Server robustness under churn: a bounded soak with random disconnects, SIGTERM drain, --no-restart-worker.

The soak's invariant: after hundreds of requests under a KV budget far smaller than the
load needs (so the scheduler evicts and preempts), with clients vanishing at random points,
every request that was not abandoned completed in full, nothing runs, no page is held
or locked, and flushing the cache returns every page to the free list.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time

import httpx
import pytest
from server_process import KEY, TINY_ARGS, running_server

HEADERS = {"Authorization": f"Bearer {KEY}"}
N_REQUESTS = 300
CONCURRENCY = 24


@pytest.fixture(scope="module")
def small_server(tiny_llama):
    # ~100 pages of 4 tokens against up to 16 running requests of up to ~60 tokens each.
    with running_server(*TINY_ARGS, "--kv-memory-gb", "0.0002", "--max-running-requests", "16", model=tiny_llama) as s:
        yield s


async def one_request(client: httpx.AsyncClient, rng: random.Random, i: int) -> str:
    """One random request; returns 'done' (checked complete) or 'left' (the client walked away)."""
    prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(1, 40))]
    max_tokens = rng.randrange(1, 24)
    n = 2 if rng.random() < 0.1 else 1
    stream = rng.random() < 0.6
    leave = rng.random() < 0.2
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "n": n, "stream": stream}
    if rng.random() < 0.3:
        body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": max_tokens, "ignore_eos": True}}
        body["stream"], n = stream, 1
    path = "/generate" if "input_ids" in body else "/v1/completions"
    if leave and not stream:  # walk away at a random moment (or get the answer first)
        try:
            await asyncio.wait_for(client.post(path, json=body), timeout=rng.uniform(0.01, 0.3))
        except asyncio.TimeoutError:
            pass
        return "left"
    if not stream:
        r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        if path == "/generate":
            assert data["meta_info"]["completion_tokens"] == max_tokens
        else:
            assert data["usage"]["completion_tokens"] == max_tokens * n
            assert all(c["finish_reason"] == "length" for c in data["choices"])
        return "done"
    events = []
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if leave and len(events) >= rng.randrange(1, 6):
                    return "left"
    assert events[-1] == "[DONE]" and "error" not in events[-2]
    if path == "/generate":
        assert len(json.loads(events[-2])["output_ids"]) == max_tokens
    else:
        finished = [c for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
        assert len(finished) == n and all(c["finish_reason"] == "length" for c in finished)
    return "done"


def test_soak_leaves_no_locked_or_leaked_pages(small_server):
    rng = random.Random(0)

    async def run() -> list[str]:
        sem = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(base_url=small_server.url, headers=HEADERS, timeout=120) as client:

            async def guarded(i: int) -> str:
                async with sem:
                    return await one_request(client, random.Random(rng.random()), i)

            return await asyncio.wait_for(asyncio.gather(*(guarded(i) for i in range(N_REQUESTS))), timeout=240)

    outcomes = asyncio.run(run())
    assert outcomes.count("done") > N_REQUESTS // 2 and "left" in outcomes
    s = small_server.wait_idle()
    assert s["num_running"] == 0 and s["num_waiting"] == 0
    assert s["used_pages"] == 0 and s["protected_pages"] == 0
    assert s["free_pages"] + s["cached_pages"] == s["total_pages"]
    assert s["num_preemptions"] > 0 or s["evicted_tokens"] > 0  # the budget really was tight
    assert httpx.post(small_server.url + "/flush_cache", headers=HEADERS).status_code == 200
    after = httpx.get(small_server.url + "/stats", headers=HEADERS).json()
    assert after["free_pages"] == after["total_pages"]


def test_sigterm_drains_in_flight_requests(small_server):
    """Last use of the module server: SIGTERM lets a running stream finish, then the process exits 0."""
    worker = httpx.get(small_server.url + "/get_server_info", headers=HEADERS).json()["worker_pid"]
    first_chunk = threading.Event()
    events: list[str] = []

    def consume() -> None:
        body = {"prompt": "w5 w6", "max_tokens": 60, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", small_server.url + "/v1/completions", json=body, headers=HEADERS, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_chunk.set()

    t = threading.Thread(target=consume)
    t.start()
    assert first_chunk.wait(30)
    small_server.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert events[-1] == "[DONE]"
    finished = [c for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
    assert [c["finish_reason"] for c in finished] == ["length"]
    assert small_server.proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def test_no_restart_worker_exits_nonzero(tiny_llama):
    with running_server(*TINY_ARGS, "--no-restart-worker", model=tiny_llama) as server:
        pid = httpx.get(server.url + "/get_server_info", headers=HEADERS).json()["worker_pid"]
        os.kill(pid, signal.SIGKILL)
        assert server.proc.wait(30) == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie counts as gone: it has exited and waits only for its parent to reap it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_worker_exits_when_front_end_is_killed(tiny_llama):
    """SIGKILL leaves the front end no chance to clean up: the worker notices and exits by itself."""
    with running_server(*TINY_ARGS, model=tiny_llama) as server:
        pid = httpx.get(server.url + "/get_server_info", headers=HEADERS).json()["worker_pid"]
        server.proc.kill()
        server.proc.wait(10)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
