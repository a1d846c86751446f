"""Prefix reuse: the radix cache and scheduling policies on four workloads, same run.

    python bench/prefix_reuse.py            # all workloads, all variants, default model
    python bench/prefix_reuse.py --quick    # smaller workloads, for a smoke run

Workloads: (a) few-shot: one ~1,500-token shared prefix + 64 short questions; (b) multi-turn
chat: 16 conversations x 5 turns behind a 400-token system prompt, turns interleaved
(shuffled) across conversations; (c) tree-of-thought: 3 branches x 3 levels; (d) control:
unrelated prompts. Variants: cache + lpm / dfs-weight / fcfs, cache off; and (b) again under a
KV budget that holds about a third of the conversations. The optimal hit rate replays each
workload's token sequences through an unbounded page-aligned cache.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import zlib

from common import RESULTS_DIR, save, table
from tqdm import tqdm

from radixrt import Engine

WORDS = ("river mountain lantern copper violet meadow harbor signal pepper orbit canyon marble whisper "
         "thunder saddle compass glacier ember puzzle falcon quartz willow tunnel beacon cedar").split()  # fmt: skip


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


class Runner:
    """Runs a workload on an engine, recording every request's tokens, usage and TTFT."""

    def __init__(self, engine: Engine, max_new: int) -> None:
        self.engine, self.max_new = engine, max_new
        self.records: list[tuple[list[int], list[int], int, float]] = []  # prompt, output, cached, ttft
        self.params = {"max_new_tokens": max_new, "min_new_tokens": max_new, "temperature": 0}

    def round(self, prompts: list[str]) -> list[str]:
        ids = [self.engine.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outs = self.engine.generate(input_ids=ids, sampling_params=self.params)
        for i, o in zip(ids, outs):
            self.records.append((i, o.token_ids, o.usage.cached_tokens, o.ttft or 0.0))
        return [o.text for o in outs]


def few_shot(run: Runner, rng: random.Random, n: int, prefix_words: int) -> None:
    shots = "".join(f"Q: {text(rng, 12)}?\nA: {text(rng, 20)}.\n\n" for _ in range(prefix_words // 32))
    run.round([f"{shots}Q: {text(rng, 10)}?\nA:" for _ in range(n)])


def multi_turn(run: Runner, rng: random.Random, convs: int, turns: int, system_words: int) -> None:
    system = f"System: you are a helpful assistant. Rules: {text(rng, system_words)}\n"
    histories = [system for _ in range(convs)]
    for _ in range(turns):
        order = list(range(convs))
        rng.shuffle(order)
        prompts = [histories[c] + f"User: {text(rng, 15)}\nAssistant:" for c in order]
        replies = run.round(prompts)
        for c, prompt, reply in zip(order, prompts, replies):
            histories[c] = prompt + reply + "\n"


def tree_of_thought(run: Runner, rng: random.Random, branches: int, levels: int) -> None:
    frontier = [f"Problem: {text(rng, 120)}\nLet us think step by step.\n"]
    for level in range(levels):
        prompts = [f"{node}Thought {level}.{b}:" for node in frontier for b in range(branches)]
        frontier = [p + reply + "\n" for p, reply in zip(prompts, run.round(prompts))]


def control(run: Runner, rng: random.Random, n: int) -> None:
    run.round([f"{i} {text(rng, 60)}" for i in range(n)])


def replay(records, page_size: int) -> tuple[float, int]:
    """Optimal hit rate and KV footprint of a workload: replays it through an unbounded page-aligned
    cache that sees each request after everything submitted before it. Returns (hit rate, distinct
    tokens, i.e. how many tokens of KV hold the whole workload at once)."""
    seen: set[tuple[int, ...]] = set()
    hit = total = 0
    for prompt, output, _, _ in records:
        usable = prompt[:-1]  # the last prompt token is always computed
        pages = len(usable) // page_size
        matched = 0
        while matched < pages and tuple(usable[: (matched + 1) * page_size]) in seen:
            matched += 1
        hit += matched * page_size
        total += len(prompt)
        full = prompt + output
        for i in range(1, len(full) // page_size + 1):
            seen.add(tuple(full[: i * page_size]))
    return hit / max(total, 1), len(seen) * page_size


def shared_prefix_len(records) -> int:
    """Tokens every prompt of the workload starts with (the system prompt of (b))."""
    prompts = [r[0] for r in records]
    n = min(map(len, prompts))
    return next((i for i in range(n) if any(p[i] != prompts[0][i] for p in prompts)), n)


def third_of_conversations(run: dict) -> int:
    """A KV pool that holds the shared system prompt and a third of (b)'s conversations at full
    length: the memory-pressure variant, sized from the unbounded run's measured footprint."""
    shared = run["shared_prefix_tokens"]
    return int(shared + (run["workload_kv_tokens"] - shared) / 3)


def measure(engine: Engine, workload, seed: int, max_new: int) -> dict:
    engine.flush_cache()
    run = Runner(engine, max_new)
    start = time.perf_counter()
    workload(run, random.Random(seed))
    secs = time.perf_counter() - start
    prompt = sum(len(r[0]) for r in run.records)
    out = sum(len(r[1]) for r in run.records)
    optimal, footprint = replay(run.records, engine.config.page_size)
    stats = engine.stats()
    return {
        "seconds": secs,
        "requests": len(run.records),
        "output_tok_s": out / secs,
        "total_tok_s": (prompt + out) / secs,
        "mean_ttft_s": sum(r[3] for r in run.records) / len(run.records),
        "hit_rate": sum(r[2] for r in run.records) / max(prompt, 1),
        "optimal_hit_rate": optimal,
        "workload_kv_tokens": footprint,
        "shared_prefix_tokens": shared_prefix_len(run.records),
        "pool_tokens": stats.total_pages * engine.config.page_size,
        "evicted_tokens": stats.evicted_tokens,
        "preemptions": stats.num_preemptions,
    }


def keep_earlier_runs(results: list[dict], tight_tokens, config: dict) -> tuple[list[dict], int | None]:
    """With --workloads, keep the last results file's rows of the workloads not re-run (same settings)."""
    path = RESULTS_DIR / "prefix_reuse.json"
    if not path.exists():
        return results, tight_tokens
    earlier = json.loads(path.read_text())
    same = {k: earlier["config"].get(k) for k in ("model", "dtype", "max_new", "quick")}
    if same != {k: config[k] for k in same}:
        return results, tight_tokens
    rerun = {r["workload"] for r in results}
    kept = [
        dict(r, measured=r.get("measured") or earlier["machine"]["date"])
        for r in earlier["runs"]
        if r["workload"] not in rerun
    ]
    merged = sorted(
        kept + results, key=lambda r: ("tight" in r["variant"], r["workload"])
    )  # stable: variant order stays
    return merged, tight_tokens if tight_tokens is not None else earlier.get("tight_kv_tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-new", type=int, default=16, help="output tokens per request")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--workloads",
        default="a,b,c,d",
        help="which workloads (letters) to run; the others' rows are kept from the last results file",
    )
    args = parser.parse_args()
    q = args.quick
    chosen = set(args.workloads.split(","))
    workloads = {
        "a few-shot": lambda r, g: few_shot(r, g, 16 if q else 64, 400 if q else 1500),
        "b multi-turn": lambda r, g: multi_turn(r, g, 4 if q else 16, 3 if q else 5, 100 if q else 400),
        "c tree-of-thought": lambda r, g: tree_of_thought(r, g, 3, 2 if q else 3),
        "d control": lambda r, g: control(r, g, 16 if q else 64),
    }
    workloads = {name: run for name, run in workloads.items() if name[0] in chosen}
    variants = {
        "lpm": {"schedule_policy": "lpm"},
        "dfs-weight": {"schedule_policy": "dfs-weight"},
        "fcfs": {"schedule_policy": "fcfs"},
        "cache off": {"disable_radix_cache": True},
    }
    plan = [(w, v, opts) for w in workloads for v, opts in variants.items()]
    if "b multi-turn" in workloads:
        plan += [
            ("b multi-turn", f"{v} (tight KV)", dict(opts, tight=True))
            for v, opts in variants.items()
            if v != "cache off"
        ]
    results = []
    engines: dict[str, Engine] = {}
    tight_tokens = None
    for workload, variant, opts in tqdm(plan, desc="prefix reuse", unit="run"):
        if opts.pop("tight", False):
            opts["max_total_tokens"] = tight_tokens
        key = repr(sorted(opts.items()))
        if key not in engines:
            for e in engines.values():
                e.shutdown()
            engines = {key: Engine(args.model, dtype=args.dtype, max_running_requests=64, **opts)}
        r = measure(engines[key], workloads[workload], seed=zlib.crc32(workload.encode()) % 1000, max_new=args.max_new)
        r.update(workload=workload, variant=variant, measured=time.strftime("%Y-%m-%d %H:%M"))
        results.append(r)
        if workload == "b multi-turn" and variant == "lpm":
            tight_tokens = third_of_conversations(r)
    for e in engines.values():
        e.shutdown()

    results, tight_tokens = keep_earlier_runs(results, tight_tokens, vars(args))
    rows = []
    base = {r["workload"]: r for r in results if r["variant"] == "cache off"}
    for r in results:
        off = base.get(r["workload"])
        r["speedup_vs_cache_off"] = r["total_tok_s"] / off["total_tok_s"] if off else None
        rows.append({
            "workload": r["workload"], "variant": r["variant"], "req": r["requests"],
            "total tok/s": r["total_tok_s"], "speedup": r["speedup_vs_cache_off"] or "",
            "mean TTFT s": r["mean_ttft_s"], "hit rate": r["hit_rate"], "optimal": r["optimal_hit_rate"],
            "evicted": r["evicted_tokens"], "preempted": r["preemptions"], "pool": r["pool_tokens"],
        })  # fmt: skip
    cols = [
        "workload",
        "variant",
        "req",
        "total tok/s",
        "speedup",
        "mean TTFT s",
        "hit rate",
        "optimal",
        "evicted",
        "preempted",
        "pool",
    ]
    print(f"\nmodel: default SmolLM2-135M-Instruct, dtype {args.dtype}, {args.max_new} output tokens per request\n")
    print(table(rows, cols))
    print(f"tight KV: a pool of {tight_tokens} tokens (shared system prompt + a third of the conversations)")
    print(
        "results:",
        save(
            "prefix_reuse",
            {
                "config": {k: v for k, v in vars(args).items() if k != "workloads"},
                "tight_kv_tokens": tight_tokens,
                "runs": results,
            },
        ),
    )


if __name__ == "__main__":
    main()
