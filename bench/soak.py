"""Soak and chaos: thousands of requests of every kind against `radixrt serve` on a small KV pool,
with clients that leave at random and two worker kills; afterwards nothing may be lost, leaked
or locked.

    nice python bench/soak.py                     # 10,000 requests, ~10-20 min on our 2-core CPU
    nice python bench/soak.py --requests 300      # a smoke run (~1 min)

The mix: chat and completions, streamed or not, n > 1, JSON-schema output (response_format),
/generate with stop strings, cache salts, and DSL programs that fork (radixrt.lang through
`RuntimeEndpoint`). About one request in eight is abandoned by its client: a non-streamed one by
a timeout (the connection drops), a stream after a few events. After a third and two thirds of
the requests have started, the worker process is SIGKILLed; the server restarts it.

Each request ends as one of: ok (complete, checked), left (its client walked away), refused in
a kill (a 503, or a stream's error event, while the worker was down: the clean way to fail),
or lost (anything else: a hang, a 5xx outside a kill, a wrong answer). The report: lost (must be
0), 5xx outside the kills (0), used and locked KV pages once idle (0), p50/p99 latency of a cheap
probe request sent every 0.25 s throughout, front-end RSS before and after. A table to stdout,
JSON to bench/results/soak.json.

Model: the tests' tiny random-weight Llama (tests/conftest.py) with the default model's tokenizer
and chat template (SmolLM2's byte-level BPE, which the grammar engine needs), so 10,000 requests
fit in minutes on 2 cores; its text is noise, but every path runs (chat template, tokenizer,
grammar, stop strings, streaming, preemption). `--model` takes a real checkpoint instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from common import save, table  # noqa: E402

import radixrt as sgl  # noqa: E402
from radixrt.lang.errors import BackendError  # noqa: E402
from radixrt.model.loader import resolve_model_path  # noqa: E402

KEY = "soak-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
KINDS = {  # weights of the request mix
    "chat": 3,
    "chat_stream": 3,
    "completion": 2,
    "completion_stream": 2,
    "n_choices": 1.5,
    "json_schema": 1.5,
    "generate": 1.5,
    "generate_stream": 1,
    "dsl_fork": 1,
}
LEAVE = 0.12  # chance that a client walks away mid-request
SALTS = [None, None, "tenant-a", "tenant-b"]
SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "tag": {"enum": ["red", "green", "blue"]}},
    "required": ["id", "tag"],
}
SYSTEM = " ".join(f"w{i}" for i in range(100, 160))  # a shared prefix: the cache has work to do


@sgl.function
def fork_program(s, prefix):
    s += prefix
    forks = s.fork(3)
    forks += lambda i: f" w{70 + i}" + sgl.gen("leaf", max_tokens=4, ignore_eos=True)
    forks.join()


@dataclass
class Run:
    url: str
    rng: random.Random
    outcomes: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    kills: list[tuple[float, float]] = field(default_factory=list)  # (killed at, healthy again) monotonic
    killing: float | None = None  # a kill in progress since
    up: asyncio.Event = field(default_factory=asyncio.Event)  # cleared while the worker restarts
    server_errors: int = 0  # 5xx outside the kills
    probe: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)

    def during_kill(self, start: float, end: float) -> bool:
        windows = self.kills + ([(self.killing, float("inf"))] if self.killing is not None else [])
        return any(start <= b + 1.0 and end >= a for a, b in windows)

    def end(self, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if outcome == "lost" and len(self.lost) < 20:
            self.lost.append(detail)


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(3, 300)}" for _ in range(n))


def request_for(kind: str, rng: random.Random) -> tuple[str, dict, int]:
    """(path, body, choices) for one request of this kind."""
    max_tokens, salt = rng.randrange(1, 48), rng.choice(SALTS)
    stop = [words(rng, 1)] if rng.random() < 0.3 else None
    messages = [{"role": "user", "content": words(rng, rng.randrange(1, 40))}]
    if rng.random() < 0.5:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    common = {"max_tokens": max_tokens, "cache_salt": salt, "stop": stop, "temperature": rng.choice([0, 0.7])}
    if kind.startswith("chat"):
        return "/v1/chat/completions", {**common, "messages": messages, "stream": kind.endswith("stream")}, 1
    if kind.startswith("completion") or kind == "n_choices":
        n = rng.randrange(2, 5) if kind == "n_choices" else 1
        prompt = SYSTEM + " " + words(rng, 8) if rng.random() < 0.5 else words(rng, rng.randrange(1, 60))
        body = {**common, "prompt": prompt, "n": n, "stream": kind.endswith("stream") or rng.random() < 0.3}
        return "/v1/completions", body, n
    if kind == "json_schema":
        fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}
        return "/v1/chat/completions", {**common, "max_tokens": 40, "messages": messages, "response_format": fmt}, 1
    params = {"max_new_tokens": max_tokens, "stop": stop or [], "temperature": common["temperature"]}
    body = {"text": words(rng, rng.randrange(1, 60)), "sampling_params": params, "cache_salt": salt}
    return "/generate", {**body, "stream": kind == "generate_stream"}, 1


def check(path: str, body: dict, n: int, data: dict) -> str | None:
    """What is wrong with a complete non-streamed answer, or None."""
    if path == "/generate":
        return None if data["meta_info"]["finish_reason"] else "no finish_reason"
    choices = data["choices"]
    if len(choices) != n or any(c["finish_reason"] not in ("stop", "length") for c in choices):
        return f"choices: {[c['finish_reason'] for c in choices]}"
    if "response_format" in body and choices[0]["finish_reason"] == "stop":
        reply = json.loads(choices[0]["message"]["content"])
        if set(reply) != {"id", "tag"}:
            return f"not the schema: {reply}"
    return None


async def one(run: Run, client: httpx.AsyncClient, endpoint, i: int) -> None:
    rng = random.Random(run.rng.random())
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    start = time.monotonic()
    try:
        if kind == "dsl_fork":
            try:
                state = await asyncio.to_thread(fork_program.run, SYSTEM + " " + words(rng, 4), backend=endpoint)
                done = state.error() is None and "leaf" in state and len(state["leaf"]) == 3
                error = state.error()
            except BackendError as exc:  # the request that caches the prefix before forking failed
                done, error = False, exc
            if done:
                return run.end("ok")
            # A branch that failed leaves the program without its variable: the DSL logged why.
            clean = run.during_kill(start, time.monotonic())
            return run.end("refused in a kill" if clean else "lost", f"dsl program failed: {error!r}")
        path, body, n = request_for(kind, rng)
        leave = rng.random() < LEAVE
        if not body.get("stream"):
            if leave:
                try:
                    await asyncio.wait_for(client.post(path, json=body), timeout=rng.uniform(0.01, 0.5))
                except asyncio.TimeoutError:
                    pass
                return run.end("left")
            r = await client.post(path, json=body)
            return settle(run, start, r.status_code, r.text, lambda: check(path, body, n, r.json()))
        events: list[str] = []
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return settle(run, start, r.status_code, (await r.aread()).decode(), lambda: None)
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if leave and len(events) >= rng.randrange(1, 6):
                        return run.end("left")
        if events[-1] != "[DONE]":
            return run.end("lost", f"{path}: stream ended without [DONE]")
        if '"error"' in events[-2]:
            return settle(run, start, 503 if "unavailable_error" in events[-2] else 500, events[-2], lambda: None)
        return run.end("ok")
    except Exception as exc:  # noqa: BLE001 - whatever it is, the request was lost: count it, go on
        run.end("lost", f"{kind}: {type(exc).__name__}: {exc}")


def settle(run: Run, start: float, status: int, text: str, wrong) -> None:
    if status == 200:
        problem = wrong()
        return run.end("ok" if problem is None else "lost", f"wrong answer: {problem}")
    if status == 503 and run.during_kill(start, time.monotonic()):
        return run.end("refused in a kill")
    if status >= 500:
        run.server_errors += 1
    run.end("lost", f"{status}: {text[:200]}")


async def probe(run: Run, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
    """A cheap request and a health check every 0.25 s: what any other user would see."""
    while not stop.is_set():
        await run.up.wait()
        start = time.monotonic()
        r = await client.post("/v1/completions", json={"prompt": "w5 w6", "max_tokens": 1})
        if r.status_code == 200:
            run.probe.append(time.monotonic() - start)
        start = time.monotonic()
        await client.get("/health")
        run.health.append(time.monotonic() - start)
        await asyncio.sleep(0.25)


async def kill_worker(run: Run, client: httpx.AsyncClient) -> None:
    """SIGKILL the worker; new requests wait, as behind a load balancer, until its replacement is up."""
    pid = (await client.get("/get_server_info")).json()["worker_pid"]
    run.killing = time.monotonic()
    run.up.clear()
    os.kill(pid, signal.SIGKILL)
    while True:  # a 503 until the front end has noticed, then unhealthy until the new worker is ready
        r = await client.get("/get_server_info")
        if r.status_code == 200 and r.json()["healthy"] and r.json()["worker_pid"] != pid:
            break
        await asyncio.sleep(0.2)
    run.kills.append((run.killing, time.monotonic()))
    run.killing = None
    run.up.set()


async def soak(run: Run, requests: int, concurrency: int) -> None:
    endpoint = sgl.RuntimeEndpoint(run.url, api_key=KEY)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=run.url, headers=HEADERS, timeout=120, limits=limits) as client:
        run.up.set()
        stop = asyncio.Event()
        prober = asyncio.create_task(probe(run, client, stop))
        sem = asyncio.Semaphore(concurrency)
        kill_at = {requests // 3, 2 * requests // 3}
        tasks, kills = [], []
        for i in range(requests):
            await sem.acquire()
            await run.up.wait()
            if i in kill_at:
                kills.append(asyncio.create_task(kill_worker(run, client)))
            task = asyncio.create_task(one(run, client, endpoint, i))
            task.add_done_callback(lambda _: sem.release())
            tasks.append(task)
            if i % 500 == 499:
                print(f"{i + 1:,} started; {run.outcomes}", flush=True)
        await asyncio.gather(*tasks, *kills)
        stop.set()
        await prober


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def soak_model(folder: Path) -> Path:
    """The tests' tiny random-weight Llama, with the default model's tokenizer and chat template."""
    from conftest import make_tiny_checkpoint

    make_tiny_checkpoint(folder, "llama", vocab_size=49152, max_position_embeddings=1024)
    default = resolve_model_path(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default / name, folder / name)
    return folder


def start_server(model: Path, args, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "radixrt.cli", "serve", "--port", str(port), "--model", str(model)]
    cmd += ["--api-key", KEY, "--max-total-tokens", str(args.max_total_tokens), "--page-size", "4"]
    cmd += ["--max-running-requests", "16", "--num-threads", "1"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not start; see {log}")


def idle_stats(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = httpx.get(url + "/stats", headers=HEADERS).json()
        if s["num_running"] == s["num_waiting"] == 0 or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--max-total-tokens", type=int, default=2048, help="the KV pool: small, so it evicts and preempts")
    p.add_argument("--model", default=None, help="a checkpoint (default: a tiny random-weight Llama)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="radixrt-soak-") as tmp:
        model = Path(args.model) if args.model else soak_model(Path(tmp) / "tiny")
        log = Path(tmp) / "server.log"
        proc, url = start_server(model, args, log)
        try:
            rss_before = rss_mib(proc.pid)
            run = Run(url, random.Random(args.seed))
            started = time.monotonic()
            asyncio.run(soak(run, args.requests, args.concurrency))
            seconds = time.monotonic() - started
            stats = idle_stats(url)
            flushed = httpx.post(url + "/flush_cache", headers=HEADERS).status_code == 200
            after_flush = httpx.get(url + "/stats", headers=HEADERS).json()
            rss_after = rss_mib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        if run.lost:
            print("lost requests, first ones:\n  " + "\n  ".join(run.lost) + f"\nserver log: {log.read_text()[-3000:]}")
    probe = f"{pct(run.probe, 0.5):.3f} / {pct(run.probe, 0.99):.3f} / {max(run.probe, default=float('nan')):.3f}"
    whole = stats["free_pages"] + stats["cached_pages"] == stats["total_pages"]
    all_free = flushed and after_flush["free_pages"] == after_flush["total_pages"]
    rows = [
        ("requests", f"{args.requests:,} in {seconds:,.0f} s", ""),
        *((f"  {k}", f"{v:,}", "") for k, v in sorted(run.outcomes.items())),
        ("lost", run.outcomes.get("lost", 0), 0),
        ("5xx outside the worker kills", run.server_errors, 0),
        ("worker kills: down for (s)", ", ".join(f"{b - a:.1f}" for a, b in run.kills), "2 kills"),
        ("idle: running + waiting", stats["num_running"] + stats["num_waiting"], 0),
        ("idle: used pages (leaked)", stats["used_pages"], 0),
        ("idle: protected pages (locked)", stats["protected_pages"], 0),
        ("idle: free + cached == total", whole, True),
        ("flush: every page free", all_free, True),
        ("preemptions / evicted tokens", f"{stats['num_preemptions']:,} / {stats['evicted_tokens']:,}", "> 0"),
        ("probe request p50 / p99 / max (s)", probe, ""),
        ("/health p99 / max (s)", f"{pct(run.health, 0.99):.3f} / {max(run.health):.3f}", ""),
        ("front-end RSS before / after (MiB)", f"{rss_before:,.0f} / {rss_after:,.0f}", ""),
    ]
    rows = [dict(zip(("what", "value", "expected"), row)) for row in rows]
    print(table(rows, ["what", "value", "expected"]))
    path = save(
        "soak",
        {
            "args": vars(args),
            "model": args.model or "tiny random-weight llama (tests/conftest.py), SmolLM2's tokenizer",
            "seconds": seconds,
            "outcomes": run.outcomes,
            "lost": run.lost,
            "server_errors_outside_kills": run.server_errors,
            "kills": [{"down_seconds": b - a} for a, b in run.kills],
            "idle_stats": stats,
            "flushed_all_free": all_free,
            "probe_seconds": {"p50": pct(run.probe, 0.5), "p99": pct(run.probe, 0.99), "max": max(run.probe)},
            "health_seconds": {"p99": pct(run.health, 0.99), "max": max(run.health)},
            "front_end_rss_mib": {"before": rss_before, "after": rss_after},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
