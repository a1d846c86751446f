"""Serving benchmark: an async HTTP load generator against `radixrt serve`, the offline Engine on
the same workload in the same run, and optionally a peer server (llama.cpp) side by side.

    nice python bench/serve.py                          # all workloads, default model, concurrency 8
    nice python bench/serve.py --quick                  # a smoke run
    nice python bench/serve.py --peer-url http://127.0.0.1:8080   # also a llama.cpp server, same GGUF

Workloads: multi-turn chat (conversations behind one shared system prompt; a conversation's
next turn carries its history, and conversations interleave across the concurrent clients),
agent sessions (the same, but every session has its own system prompt, as agents with their own
instructions and tools do: only a session's own history is there to reuse), shared-prefix
few-shot (one long prefix, many questions), independent prompts. Every request streams, so TTFT
and inter-token latency are measured the same way on every target; outputs are a fixed length
(ignore_eos) so throughput compares like with like.
Reports output tokens/s, TTFT p50/p99, ITL p50/p99; a table to stdout, JSON to bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import save, table  # noqa: E402

from radixrt.cli import add_engine_args, engine_config  # noqa: E402
from radixrt.config import EngineConfig  # noqa: E402

WORDS = ("river mountain lantern copper violet meadow harbor signal pepper orbit canyon marble whisper "
         "thunder saddle compass glacier ember puzzle falcon quartz willow tunnel beacon cedar").split()  # fmt: skip


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass
class Session:
    """A chat (system + user turns, each carrying the history) or one completion prompt."""

    system: str | None
    turns: list[str]


def workload(name: str, rng: random.Random, quick: bool) -> list[Session]:
    s = 0.25 if quick else 1.0
    if name == "multi-turn-chat":
        system = f"You are a helpful assistant. Follow these house rules: {text(rng, int(200 * s) + 20)}."
        return [Session(system, [f"Tell me about {text(rng, 12)}." for _ in range(4)]) for _ in range(int(16 * s) or 4)]
    if name == "agent-sessions":  # each agent has its own instructions and tools: nothing shared across sessions
        count = int(16 * s) or 4
        systems = [f"You are agent {i}. Your tools and notes: {text(rng, int(200 * s) + 20)}." for i in range(count)]
        return [Session(system, [f"Next step: {text(rng, 12)}." for _ in range(4)]) for system in systems]
    if name == "few-shot":
        shots = "".join(f"Q: {text(rng, 10)}?\nA: {text(rng, 16)}.\n\n" for _ in range(int(24 * s) + 2))
        return [Session(None, [f"{shots}Q: {text(rng, 10)}?\nA:"]) for _ in range(int(32 * s) or 8)]
    if name == "independent":
        return [Session(None, [f"{i}. {text(rng, int(120 * s) + 10)}"]) for i in range(int(32 * s) or 8)]
    raise ValueError(name)


WORKLOADS = ("multi-turn-chat", "agent-sessions", "few-shot", "independent")


@dataclass
class Record:
    start: float
    end: float
    ttft: float
    itls: list[float]
    output_tokens: int
    prompt_tokens: int = 0
    cached_tokens: int = 0


# ----- targets: one streamed request each ----------------------------------------------------


class HttpTarget:
    def __init__(self, name: str, url: str, api_key: str | None = None) -> None:
        self.name, self.url = name, url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # A fresh connection per request, for every target alike: llama.cpp's server closes a kept-alive
        # connection after a few requests, and reusing one it just closed fails the request.
        limits = httpx.Limits(max_keepalive_connections=0)
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=600, limits=limits)
        self.model: str | None = None

    async def request(self, messages: list[dict] | None, prompt: str | None, max_tokens: int) -> tuple[Record, str]:
        if self.model is None:
            self.model = (await self.client.get("/v1/models")).json()["data"][0]["id"]
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
        body["stream_options"] = {"include_usage": True}
        if messages is not None:
            path, body["messages"] = "/v1/chat/completions", messages
        else:
            path, body["prompt"] = "/v1/completions", prompt
        start = time.perf_counter()
        times, parts, usage = [], [], None
        async with self.client.stream("POST", path, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for c in chunk.get("choices") or []:
                    piece = c.get("delta", {}).get("content") if messages is not None else c.get("text")
                    if piece:
                        times.append(time.perf_counter())
                        parts.append(piece)
        end = time.perf_counter()
        usage = usage or {}
        details = usage.get("prompt_tokens_details") or {}
        rec = Record(
            start,
            end,
            (times[0] if times else end) - start,
            [b - a for a, b in zip(times, times[1:])],
            usage.get("completion_tokens", len(times)),
            usage.get("prompt_tokens", 0),
            details.get("cached_tokens") or 0,
        )
        return rec, "".join(parts)

    async def close(self) -> None:
        await self.client.aclose()


class EngineTarget:
    """The offline Engine in this process, driven from threads (its API is synchronous)."""

    name = "offline Engine"

    def __init__(self, config: EngineConfig, concurrency: int) -> None:
        from radixrt.engine import Engine

        self.engine = Engine(**dataclasses.asdict(config))
        self.pool = concurrent.futures.ThreadPoolExecutor(concurrency)

    def _run(self, messages, prompt, max_tokens) -> tuple[Record, str]:
        params = {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        start = time.perf_counter()
        stream = self.engine.chat_stream(messages, params) if messages else self.engine.generate_stream(prompt, params)
        times, parts, usage = [], [], None
        for chunk in stream:
            if chunk.text:
                times.append(time.perf_counter())
                parts.append(chunk.text)
            usage = chunk.usage or usage
        end = time.perf_counter()
        rec = Record(
            start,
            end,
            (times[0] if times else end) - start,
            [b - a for a, b in zip(times, times[1:])],
            usage.completion_tokens,
            usage.prompt_tokens,
            usage.cached_tokens,
        )
        return rec, "".join(parts)

    async def request(self, messages, prompt, max_tokens):
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._run, messages, prompt, max_tokens)

    async def close(self) -> None:
        self.pool.shutdown()
        self.engine.shutdown()


# ----- the load generator --------------------------------------------------------------------


@dataclass
class Load:
    concurrency: int = 8
    rate: float = float("inf")  # request starts per second (Poisson); inf = as fast as the clients go
    duration: float = 600.0  # stop starting new requests after this many seconds
    max_requests: int = 10**9
    max_tokens: int = 48
    records: list[Record] = field(default_factory=list)


async def drive(target, sessions: list[Session], load: Load, seed: int) -> list[Record]:
    rng = random.Random(seed)
    pending = list(sessions)
    t0 = time.perf_counter()
    next_start = [t0]
    records: list[Record] = []

    async def pace() -> bool:
        if time.perf_counter() - t0 > load.duration or len(records) >= load.max_requests:
            return False
        if load.rate != float("inf"):
            next_start[0] += rng.expovariate(load.rate)
            await asyncio.sleep(max(0.0, next_start[0] - time.perf_counter()))
        return True

    async def client() -> None:
        while pending:
            session = pending.pop(0)
            history = [{"role": "system", "content": session.system}] if session.system else None
            for turn in session.turns:
                if not await pace():
                    return
                if history is not None:
                    history.append({"role": "user", "content": turn})
                    rec, reply = await target.request(list(history), None, load.max_tokens)
                    history.append({"role": "assistant", "content": reply})
                else:
                    rec, _ = await target.request(None, turn, load.max_tokens)
                records.append(rec)

    await asyncio.gather(*(client() for _ in range(load.concurrency)))
    return records


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def summarize(target: str, workload_name: str, records: list[Record]) -> dict:
    wall = max(r.end for r in records) - min(r.start for r in records)
    out = sum(r.output_tokens for r in records)
    prompt = sum(r.prompt_tokens for r in records)
    itls = [x for r in records for x in r.itls]
    return {
        "workload": workload_name,
        "target": target,
        "requests": len(records),
        "wall_s": round(wall, 2),
        "output_tok_s": round(out / wall, 1),
        "total_tok_s": round((out + prompt) / wall, 1),
        "ttft_p50_ms": round(1000 * pct([r.ttft for r in records], 50), 1),
        "ttft_p99_ms": round(1000 * pct([r.ttft for r in records], 99), 1),
        "itl_p50_ms": round(1000 * pct(itls, 50), 1),
        "itl_p99_ms": round(1000 * pct(itls, 99), 1),
        "cached_frac": round(sum(r.cached_tokens for r in records) / prompt, 3) if prompt else 0.0,
    }


# ----- running the server --------------------------------------------------------------------


def server_argv(config: EngineConfig) -> list[str]:
    argv, default = [], EngineConfig()
    for f in dataclasses.fields(EngineConfig):
        value = getattr(config, f.name)
        if value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def start_server(config: EngineConfig, log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "radixrt.cli", "serve", "--port", str(port), *server_argv(config)]
    env = dict(os.environ, RADIXRT_API_KEY="")
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"server did not become healthy; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def run_target(target, names: list[str], load: Load, args) -> list[dict]:
    rows = []
    for name in names:
        # A warm-up request outside the measurement (first-call costs: allocations, kernels).
        await target.request(None, "warm up", 4)
        sessions = workload(name, random.Random(args.seed), args.quick)
        records = await drive(target, sessions, load, args.seed)
        rows.append(summarize(target.name, name, records))
        print(table([rows[-1]], list(rows[-1])), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, from: " + ", ".join(WORKLOADS))
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rate", type=float, default=float("inf"), help="request starts per second (default: unpaced)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds per workload before no new requests start")
    p.add_argument("--max-requests", type=int, default=10**9)
    p.add_argument("--max-tokens", type=int, default=48, help="output tokens per request (fixed: ignore_eos)")
    p.add_argument("--quick", action="store_true", help="small workloads, for a smoke run")
    p.add_argument("--server-url", default=None, help="use this running radixrt server instead of starting one")
    p.add_argument("--peer-url", default=None, help="a llama.cpp (or other OpenAI-compatible) server to compare")
    p.add_argument("--peer-note", default=None, help="what the peer is (name, version, flags), for the report")
    p.add_argument("--skip-engine", action="store_true", help="do not run the offline Engine comparison")
    p.add_argument("--output", default="serve", help="result name under bench/results/ (default: %(default)s)")
    add_engine_args(p)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below: stop the server
    names = args.workloads.split(",")
    load = Load(args.concurrency, args.rate, args.duration, args.max_requests, args.max_tokens)
    config = engine_config(args)
    rows: list[dict] = []
    load_before = os.getloadavg()

    proc = None
    url = args.server_url
    if url is None:
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "radixrt-bench-serve.log"
        proc, url = start_server(config, log_path)
    try:
        target = HttpTarget("radixrt HTTP", url)
        rows += asyncio.run(_with_close(target, names, load, args))
    finally:
        if proc is not None:
            stop_server(proc)
    if not args.skip_engine:
        rows += asyncio.run(_with_close(EngineTarget(config, args.concurrency), names, load, args))
    if args.peer_url:
        rows += asyncio.run(_with_close(HttpTarget(f"peer {args.peer_url}", args.peer_url), names, load, args))

    rows.sort(key=lambda r: (names.index(r["workload"]), r["target"]))
    print()
    print(table(rows, list(rows[0])))
    ratios = {}
    for name in names:
        by = {r["target"]: r for r in rows if r["workload"] == name}
        if "radixrt HTTP" in by and "offline Engine" in by:
            ratios[name] = round(by["radixrt HTTP"]["output_tok_s"] / by["offline Engine"]["output_tok_s"], 3)
    if ratios:
        print("\nHTTP / offline Engine output tok/s:", ratios)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings["rate"] = None if load.rate == float("inf") else load.rate
    # The machine's load average around the run: anything well above the worker's own threads means
    # other work competed for the CPU and the numbers are contended.
    loadavg = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    print("load average before/after (1, 5, 15 min):", loadavg["before"], loadavg["after"])
    payload = {"settings": settings, "config": dataclasses.asdict(config), "rows": rows, "http_vs_engine": ratios}
    path = save(args.output, {**payload, "loadavg": loadavg})
    print(f"wrote {path}")


async def _with_close(target, names, load, args) -> list[dict]:
    try:
        return await run_target(target, names, load, args)
    finally:
        await target.close()


if __name__ == "__main__":
    main()
