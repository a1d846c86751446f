"""KV tiers: agent sessions whose KV is 10x the memory pool, with and without the disk tier.

    python bench/kv_tiers.py            # default model: 10 sessions, 4,096-token histories (~5-10 min)
    python bench/kv_tiers.py --quick    # 4 sessions, 1,024-token histories, one returning round (~1 min)

Workload: S sessions, each a 256-token system prompt shared by all, then its own H-token history.
Every session's first turn runs once (filling the pool many times over), then R rounds visit every
session again in a shuffled order: the session's whole history so far, a new U-token user message,
and G generated tokens, one request at a time. Variants, same workload and settings:

- memory only: a KV pool holding a tenth of the sessions' KV (or one session, if that is more):
  a returning session was evicted long ago and recomputes its history (today's behaviour);
- disk tier: the same pool over a disk tier (--kv-disk-dir) that holds everything;
- unbounded: a pool that holds everything: the hit-rate ceiling.

Reported: hit rate of the returning turns (cached / prompt tokens), throughput over the whole run,
TTFT of the returning turns; and a warm restart: TTFT of a returning turn as the first request of
a fresh engine, with the tier the first engine left on disk and without one.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time

from common import save, table

from radixrt import Engine

SYSTEM_TOKENS = 256


class Sessions:
    """Token ids of S agent sessions; turns grow each session's history by its prompt and output."""

    def __init__(self, engine: Engine, num: int, history: int, user: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = engine.worker.model_config.vocab_size
        self.system = self._words(SYSTEM_TOKENS)
        self.histories = [self.system + self._words(history) for _ in range(num)]
        self.user = user

    def _words(self, n: int) -> list[int]:
        return [self.rng.randrange(100, self.vocab - 100) for _ in range(n)]

    def turn(self, engine: Engine, session: int, gen: int) -> dict:
        prompt = self.histories[session] + self._words(self.user)
        out = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": gen, "min_new_tokens": gen,
                                                                  "temperature": 0})  # fmt: skip
        self.histories[session] = prompt + out.token_ids
        return {"prompt": len(prompt), "cached": out.usage.cached_tokens, "ttft": out.ttft or 0.0, "out": gen}


def run_variant(name: str, opts: dict, args, disk_dir: str | None = None) -> dict:
    engine_opts = dict(opts, kv_disk_dir=disk_dir, kv_disk_gb=args.disk_gb) if disk_dir else opts
    with Engine(args.model, **engine_opts) as engine:
        sessions = Sessions(engine, args.sessions, args.history, args.user, seed=0)
        start = time.perf_counter()
        first = [sessions.turn(engine, s, args.gen) for s in range(args.sessions)]
        returning = []
        for _ in range(args.rounds):
            order = list(range(args.sessions))
            sessions.rng.shuffle(order)
            returning += [sessions.turn(engine, s, args.gen) for s in order]
        secs = time.perf_counter() - start
        stats = engine.stats()
        dtype = str(engine.worker.runner.dtype).removeprefix("torch.")
    turns = first + returning
    ttfts = sorted(t["ttft"] for t in returning)
    return {
        "variant": name,
        "dtype": dtype,
        "pool_tokens": stats.total_pages * opts["page_size"],
        "hit_rate": sum(t["cached"] for t in returning) / sum(t["prompt"] for t in returning),
        "tok_s": sum(t["prompt"] + t["out"] for t in turns) / secs,
        "return_ttft_p50_ms": 1000 * statistics.median(ttfts),
        "return_ttft_p90_ms": 1000 * ttfts[int(0.9 * (len(ttfts) - 1))],
        "return_prompt_tokens": statistics.mean(t["prompt"] for t in returning),
        "seconds": secs,
        "disk_hit_tokens": stats.disk_hit_tokens,
        "disk_written_pages": stats.disk_written_pages,
        "evicted_tokens": stats.evicted_tokens,
    }


def warm_restart(opts: dict, args, disk_dir: str | None) -> dict:
    """A fresh engine's first request: session 0's next turn, its history on disk or nowhere."""
    engine_opts = dict(opts, kv_disk_dir=disk_dir, kv_disk_gb=args.disk_gb) if disk_dir else opts
    with Engine(args.model, **engine_opts) as engine:
        sessions = Sessions(engine, args.sessions, args.history, args.user, seed=0)
        turn = sessions.turn(engine, 0, args.gen)
    return {"variant": "restart, " + ("disk tier" if disk_dir else "memory only"), "hit_rate": turn["cached"] /
            turn["prompt"], "first_ttft_ms": 1000 * turn["ttft"], "return_prompt_tokens": turn["prompt"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the default model")
    ap.add_argument("--quick", action="store_true", help="4 sessions of 1,024 tokens, one returning round")
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--history", type=int, default=4096, help="tokens of each session's own history")
    ap.add_argument("--rounds", type=int, default=2, help="returning rounds after the first turns")
    ap.add_argument("--user", type=int, default=64, help="tokens of each new user message")
    ap.add_argument("--gen", type=int, default=16, help="tokens generated per turn")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--disk-gb", type=float, default=8.0)
    args = ap.parse_args()
    if args.quick:
        args.sessions, args.history, args.rounds = 4, 1024, 1
    session_tokens = SYSTEM_TOKENS + args.history + (args.rounds + 1) * (args.user + args.gen)
    total = SYSTEM_TOKENS + args.sessions * (session_tokens - SYSTEM_TOKENS)
    pool = max(total // 10, session_tokens + 2 * args.page_size)  # a tenth, or one session if that is more
    base = dict(page_size=args.page_size, chunked_prefill_size=512, max_running_requests=8)
    small, unbounded = dict(base, max_total_tokens=pool), dict(base, max_total_tokens=total + 4096)
    disk_dir = tempfile.mkdtemp(prefix="radixrt-kv-tiers-")
    try:
        rows = [run_variant("memory only", small, args), run_variant("disk tier", small, args, disk_dir),
                run_variant("unbounded", unbounded, args)]  # fmt: skip
        restarts = [warm_restart(small, args, disk_dir), warm_restart(small, args, None)]
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
    mem, disk, ceiling = rows
    print(f"\n{args.sessions} sessions x {args.history:,}-token histories, {args.rounds} returning round(s); "
          f"KV {total:,} tokens, memory pool {pool:,} ({total / pool:.1f}x smaller)\n")  # fmt: skip
    print(table(rows, ["variant", "pool_tokens", "hit_rate", "tok_s", "return_ttft_p50_ms", "return_ttft_p90_ms",
                       "seconds", "disk_hit_tokens", "evicted_tokens"]))  # fmt: skip
    print()
    print(table(restarts, ["variant", "hit_rate", "first_ttft_ms", "return_prompt_tokens"]))
    print(f"\nreturning-session TTFT: {mem['return_ttft_p50_ms'] / disk['return_ttft_p50_ms']:.1f}x better with the "
          f"tier; hit rate {100 * (ceiling['hit_rate'] - disk['hit_rate']):.1f} points under unbounded; warm "
          f"restart TTFT {restarts[1]['first_ttft_ms'] / restarts[0]['first_ttft_ms']:.1f}x better")  # fmt: skip
    config = {**vars(args), "pool_tokens": pool, "kv_tokens": total}
    print("results:", save("kv_tiers", {"config": config, "rows": rows, "restarts": restarts}))


if __name__ == "__main__":
    main()
