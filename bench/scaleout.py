"""Scaling out on this machine's cores: tensor parallelism (`tp`), data parallelism behind sglang-router (`dp`).

    python bench/scaleout.py tp [--batches 1,8] [--steps 20] [--rounds 3]
    nice python bench/scaleout.py dp [--quick] [--concurrency 8] [--max-tokens 48] [--model PATH]

`tp`: the decode step time of a `ModelRunner` (rank 0 in this process, as the worker runs it) at
tp=2, one torch thread per rank, against tp=1 with all the threads, eager (the forward tp=2 runs)
and fused (the default on the CPU). Two random-weight Llama checkpoints: a tiny one (hidden 64,
2 layers, fp32) and one of the default model's sizes (SmolLM2-135M: 30 layers, hidden 576, MLP 1536,
vocabulary 49,152, bf16) with 8 heads of 72 and 2 KV heads instead of 9 of 64 and 3, which do
not split over 2 ranks. Every sequence has `--context` tokens of KV; a step decodes one token each.
On a CPU the ranks share one memory bus, and each step adds 2 + 2 x layers + 1 collectives over
loopback gloo: this measures the plumbing, not a speed-up (that needs one GPU per rank).

`dp`: `radixrt serve --dp 2` (two replicas, one thread each, behind sglang-router) with the router's
`cache_aware` policy against `round_robin`, and against one replica with both threads (`--dp 1`),
on bench/serve.py's multi-turn chat, agent sessions and few-shot workloads and load generator
(streamed requests, fixed output length). The hit rate is the share of prompt tokens the replicas
found in their caches: each replica has its own, so it is the router's policy that decides whether
a conversation's next turn finds its history. Each setup is a fresh server on the default model
(`--model` for another).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, save, table

from radixrt.attention.base import ForwardBatch
from radixrt.config import EngineConfig
from radixrt.runner.tensor_parallel import make_runner

PAGE_SIZE = 16
MODELS = {
    "tiny (fp32)": dict(
        dtype="float32", vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ),
    "default sizes, 8/2 heads (bf16)": dict(
        dtype="bfloat16", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=8, num_key_value_heads=2, head_dim=72, tie_word_embeddings=True,
    ),
}  # fmt: skip
SETUPS = {  # name -> (tp_size, fused decoder allowed)
    "tp=1 fused": (1, True),
    "tp=1 eager": (1, False),
    "tp=2": (2, False),
}


def random_checkpoint(folder: Path, shape: dict) -> Path:
    """A random-weight Llama checkpoint of this shape (float32 safetensors; no tokenizer: the runner needs none)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in shape.items() if k != "dtype"}, max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def step(batch: int, start: int, n: int, context: int) -> ForwardBatch:
    """`n` new tokens from position `start` for each of `batch` sequences; sequence i owns the pages
    of its `context` + 1 tokens from page i * pages on."""
    pages = -(-(context + 1) // PAGE_SIZE)
    tables = [list(range(i * pages, (i + 1) * pages)) for i in range(batch)]
    slots = [t[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for t in tables for p in range(start, start + n)]
    return ForwardBatch(
        input_ids=torch.randint(3, 300, (batch * n,)),
        positions=torch.arange(start, start + n).repeat(batch),
        out_slots=torch.tensor(slots),
        qo_indptr=list(range(0, batch * n + 1, n)),
        prefix_lens=[start] * batch,
        seq_lens=[start + n] * batch,
        page_tables=tables,
        logits_indices=torch.arange(n - 1, batch * n, n),
        page_size=PAGE_SIZE,
    )


def decode_ms(runner, batch: int, context: int, steps: int) -> tuple[float, float]:
    """Median and best wall time of one decode step (`batch` sequences of `context` tokens) over
    `steps`, after 3 warm-up steps."""
    decode = step(batch, context, 1, context)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        runner.forward(decode)
        if i >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def tp_section(args) -> list[dict]:
    """Every setup of a model loaded at once and measured round-robin, keeping each point's best
    round: on a shared machine a burst of other work then spoils one round, not the result."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="radixrt-bench-tp-") as tmp:
        for model, shape in MODELS.items():
            folder = random_checkpoint(Path(tmp) / model.split()[0], shape)
            runners = {}
            try:
                for setup, (tp, fused) in SETUPS.items():
                    torch.set_num_threads(args.threads)  # tp=2 splits these between its ranks
                    config = EngineConfig(
                        model=str(folder), dtype=shape["dtype"], page_size=PAGE_SIZE, tp_size=tp,
                        disable_fused_decoder=not fused,
                        max_total_tokens=max(args.batches) * (args.context + PAGE_SIZE),
                    )  # fmt: skip
                    runners[setup] = make_runner(config, folder)
                    runners[setup].forward(step(max(args.batches), 0, args.context, args.context))  # the KV
                best: dict[tuple[str, int], tuple[float, float]] = {}
                for _ in range(args.rounds):
                    for setup, runner in runners.items():
                        torch.set_num_threads(args.threads // SETUPS[setup][0])
                        for batch in args.batches:
                            point = decode_ms(runner, batch, args.context, args.steps)
                            best[setup, batch] = min(best.get((setup, batch), point), point)
            finally:
                for runner in runners.values():
                    runner.close()
            for (setup, batch), (median, fastest) in best.items():
                rows.append({"model": model, "setup": setup, "threads per rank": args.threads // SETUPS[setup][0],
                             "batch": batch, "step ms": median, "best ms": fastest,
                             "tok/s": batch * 1e3 / median})  # fmt: skip
            print(table(rows[-len(best) :], list(rows[-1])), flush=True)
    return rows


DP_SETUPS = {  # name -> `radixrt serve` flags; every setup gets the same --threads in all
    "dp=2 cache_aware": ["--dp", "2", "--router-policy", "cache_aware"],
    "dp=2 round_robin": ["--dp", "2", "--router-policy", "round_robin"],
    "dp=1": [],
}
DP_WORKLOADS = ("multi-turn-chat", "agent-sessions", "few-shot")
DP_COLUMNS = ["workload", "setup", "requests", "hit rate", "output tok/s", "TTFT p50 ms", "TTFT p99 ms"]


def start_server(flags: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """`radixrt serve` on a free port; returns once it prints that it serves (after the router, with --dp)."""
    from radixrt.server.data_parallel import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "radixrt.cli", "serve", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, RADIXRT_API_KEY=""))  # fmt: skip
    ready = re.compile(rf"radixrt: serving .* on http://127\.0\.0\.1:{port}\b")
    deadline = time.monotonic() + 900
    while not ready.search(log_path.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start; see {log_path}")
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port}"


def dp_section(args) -> list[dict]:
    import serve as serve_bench  # bench/serve.py: the workloads, the load generator, the summary

    rows = []
    for setup, flags in DP_SETUPS.items():
        flags = [*flags, "--num-threads", str(args.threads), *(["--model", args.model] if args.model else [])]
        log_path = Path(tempfile.gettempdir()) / "radixrt-bench-scaleout-dp.log"
        proc, url = start_server(flags, log_path)
        try:
            load = serve_bench.Load(args.concurrency, max_tokens=args.max_tokens)
            target = serve_bench.HttpTarget(setup, url)
            summaries = asyncio.run(serve_bench._with_close(target, list(DP_WORKLOADS), load, args))
        finally:
            serve_bench.stop_server(proc)
        rows += [{"workload": r["workload"], "setup": setup, "requests": r["requests"],
                  "hit rate": r["cached_frac"], "output tok/s": r["output_tok_s"],
                  "TTFT p50 ms": r["ttft_p50_ms"], "TTFT p99 ms": r["ttft_p99_ms"]} for r in summaries]  # fmt: skip
    hit = {(r["workload"], r["setup"]): 100 * r["hit rate"] for r in rows}
    for workload in ("multi-turn-chat", "agent-sessions"):
        aware, rr, one = (hit[workload, s] for s in DP_SETUPS)
        print(f"{workload} hit rate: cache_aware {aware:.1f}% vs round_robin {rr:.1f}% ({aware - rr:+.1f} points; "
              f"target >= +20) and dp=1 {one:.1f}% ({aware - one:+.1f} points; target within 5)")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=["tp", "dp"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in all")
    tp = parser.add_argument_group("tp")
    tp.add_argument("--batches", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    tp.add_argument("--context", type=int, default=256, help="KV tokens per sequence")
    tp.add_argument("--steps", type=int, default=20, help="timed decode steps per point (median)")
    tp.add_argument("--rounds", type=int, default=3, help="round-robin rounds; each point's best is kept")
    dp = parser.add_argument_group("dp")
    dp.add_argument("--quick", action="store_true", help="bench/serve.py's small workloads")
    dp.add_argument("--concurrency", type=int, default=8, help="clients (default: %(default)s)")
    dp.add_argument("--max-tokens", type=int, default=48, help="output tokens per request (default: %(default)s)")
    dp.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    dp.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.section == "tp":
        rows = tp_section(args)
        columns = ["model", "setup", "threads per rank", "batch", "step ms", "best ms", "tok/s"]
        settings = {"context": args.context, "steps": args.steps, "rounds": args.rounds}
    else:
        rows = dp_section(args)
        columns = DP_COLUMNS
        settings = {"threads": args.threads, "quick": args.quick, "concurrency": args.concurrency,
                    "max_tokens": args.max_tokens, "model": args.model}  # fmt: skip
    print(table(rows, columns))
    previous = RESULTS_DIR / "scaleout.json"  # keep the other sections' results
    sections = json.loads(previous.read_text()) if previous.is_file() else {}
    sections.pop("machine", None)
    sections[args.section] = {**settings, "load_average": os.getloadavg(), "rows": rows}
    print(f"wrote {save('scaleout', sections)}")


if __name__ == "__main__":
    main()
