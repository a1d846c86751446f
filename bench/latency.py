"""Single-stream latency: decode and prefill speed of one request, per dtype / quantization, beside llama.cpp.

    python bench/latency.py                              # every configuration below, default model
    python bench/latency.py --configs default,bf16 --quick  # a subset, fewer repeats
    python bench/latency.py --llama-bench ~/llama.cpp/build/bin/llama-bench

For each radixrt configuration (the default: bf16 compute on a CPU with AVX512_BF16 and the GGUF's
own 4-bit weights; bf16 weights, with the fused decoder and op by op from Python; float32; int8 and
int4 weights requantized from bf16) it measures, through the in-process Engine (what a DSL program
or an agent loop sees):
  - decode tok/s at batch 1 (streamed, from the first token to the 128th), 8 and 32;
  - prefill tok/s of a 512-token prompt with the cache off, and TTFT of a 2,000-token prompt whose
    first 1,984 tokens are cached;
  - the bytes of weights a decode step reads, and what that makes in GB/s against the machine's
    read bandwidth, measured in the same run.
llama.cpp's `llama-bench` (pp512 and tg128, 2 threads) runs on the same GGUF in the same run when it
is on PATH or given with --llama-bench (docs/benchmarks.md says how to build it), once per round
between the radixrt configurations. Configurations alternate, best of --repeats each: this machine's
neighbours come and go (a run that timed llama.cpp only at its end once gave 1.39x for a batch-1
ratio that runs an hour apart put at 1.63x and 2.00x). One engine runs at a time,
built afresh each round, as a user runs one (two engines in one process each keep an OpenMP pool,
and on 2 cores that slows both).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from common import save, table
from tqdm import tqdm

from radixrt import Engine
from radixrt.model.loader import default_gguf_path

CONFIGS = {  # name -> Engine options
    "default": {},  # dtype auto (bf16 here) + quantization auto (the GGUF's own 4-bit weights)
    "bf16": {"quantization": "none"},
    "bf16-eager": {"quantization": "none", "disable_fused_decoder": True},  # the forward op by op from Python
    "float32": {"dtype": "float32", "quantization": "none"},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4"},
}
PROMPT = "Write a long, detailed story about a lighthouse keeper and the sea. " * 8


def read_bandwidth_gbs(mb: int = 512) -> float:
    """A sum over a buffer far larger than the caches: how fast this machine streams memory."""
    x = torch.ones(mb * 2**20 // 4)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def weight_bytes(engine: Engine) -> int:
    """Bytes one decode step reads: every parameter and buffer of the model once (a tied head once)."""
    model = engine.worker.runner.model
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen and t.dim() >= 2:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def decode_b1(engine: Engine, prompt_ids: list[int], tokens: int) -> float:
    """tok/s between the first and the last of `tokens` streamed tokens."""
    engine.flush_cache()
    stamps = []
    for delta in engine.generate_stream(input_ids=prompt_ids, sampling_params=_greedy(tokens)):
        stamps += [time.perf_counter()] * len(delta.token_ids)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def decode_batch(engine: Engine, prompts: list[list[int]], tokens: int) -> float:
    """Decode tok/s of a batch: a long and a short run, so that prefill cancels out."""
    runs = []
    for n in (8, 8 + tokens):
        engine.flush_cache()
        start = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params=_greedy(n))
        runs.append(time.perf_counter() - start)
    return len(prompts) * tokens / (runs[1] - runs[0])


def ttft(engine: Engine, prompt_ids: list[int], flush: bool = True) -> float:
    if flush:
        engine.flush_cache()
    return engine.generate(input_ids=prompt_ids, sampling_params=_greedy(1)).ttft


def _greedy(n: int) -> dict:
    return {"max_new_tokens": n, "min_new_tokens": n, "temperature": 0, "ignore_eos": True}


def measure(engine: Engine, quick: bool) -> dict:
    tok = engine.tokenizer
    ids = tok.encode(PROMPT * 40, add_special_tokens=False)
    prompt64, prompt512, long_prompt = ids[:64], ids[:512], ids[:2000]
    batch = [ids[i * 16 : i * 16 + 64] for i in range(32)]
    ttft(engine, prompt512)  # warm up
    out = {"decode_b1": decode_b1(engine, prompt64, 64 if quick else 128)}
    out["decode_b8"] = decode_batch(engine, batch[:8], 16 if quick else 64)
    out["decode_b32"] = decode_batch(engine, batch, 16 if quick else 64)
    out["prefill_512"] = 512 / ttft(engine, prompt512)
    engine.generate(input_ids=long_prompt[:1984] + [13] * 16, sampling_params=_greedy(1))  # caches 1,984 tokens
    out["ttft_cached_2000_ms"] = 1e3 * ttft(engine, long_prompt, flush=False)
    return out


def llama_bench(path: str, gguf: str) -> dict:
    """llama.cpp's own numbers on the same GGUF: prompt processing (pp512) and generation (tg128)."""
    cmd = [path, "-m", gguf, "-p", "512", "-n", "128", "-t", "2", "-r", "1", "-o", "json"]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    result = {"command": " ".join(cmd), "build": rows[0].get("build_commit")}
    for r in rows:
        key = "pp512" if r.get("n_prompt") else "tg128"
        result[key] = r["avg_ts"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; each number is its best")
    parser.add_argument("--llama-bench", default=shutil.which("llama-bench"), help="path of llama.cpp's llama-bench")
    parser.add_argument("--quick", action="store_true", help="one round, shorter runs")
    args = parser.parse_args()
    names = args.configs.split(",")
    repeats = 1 if args.quick else args.repeats
    with ThreadPoolExecutor(1) as thread:  # torch's thread pool goes with the thread (see below)
        bandwidth = thread.submit(read_bandwidth_gbs).result()
    # One engine at a time, as a user runs one: each engine's thread has its own OpenMP pool, and two
    # pools on 2 cores make libgomp stop spinning between parallel regions (a slower step for both).
    runs: dict[str, list[dict]] = {name: [] for name in names}
    facts: dict[str, dict] = {}
    peer_runs: list[dict] = []
    for _ in tqdm(range(repeats), desc="rounds"):
        if args.llama_bench:  # in every round, beside the configurations it is compared with
            peer_runs.append(llama_bench(args.llama_bench, str(default_gguf_path())))
        for name in names:
            with Engine(**CONFIGS[name]) as engine:
                runs[name].append(measure(engine, args.quick))
                runner = engine.worker.runner
                facts[name] = {
                    "dtype": str(runner.dtype).removeprefix("torch."),
                    "weight_mb": weight_bytes(engine) / 2**20,
                    "fused_decoder": runner.fused is not None,
                    "quantization": runner.quantization or "none",
                }
    results, rows = {}, []
    for name in names:
        best = {k: (min if k.startswith("ttft") else max)(r[k] for r in runs[name]) for k in runs[name][0]}
        best.update(facts[name])
        best["decode_b1_gbs"] = best["weight_mb"] * 2**20 * best["decode_b1"] / 1e9
        results[name] = best
        rows.append({"config": name, **{k: v for k, v in best.items() if k != "fused_decoder"}})
    peer = None
    if peer_runs:
        best = {key: max(r[key] for r in peer_runs) for key in ("pp512", "tg128")}  # best of rounds, as ours
        peer = {**peer_runs[0], **best, "rounds": len(peer_runs)}
        rows.append({"config": "llama.cpp (llama-bench)", "decode_b1": peer["tg128"], "prefill_512": peer["pp512"]})
    columns = ["config", "dtype", "quantization", "weight_mb", "decode_b1", "decode_b1_gbs", "decode_b8", "decode_b32",
               "prefill_512", "ttft_cached_2000_ms"]  # fmt: skip
    print(f"\nmachine read bandwidth: {bandwidth:.1f} GB/s (sum over 512 MB)\n")
    print(table(rows, columns))
    if peer:
        for name, r in results.items():
            print(f"{name}: batch-1 decode {r['decode_b1'] / peer['tg128']:.2f}x llama.cpp tg128, "
                  f"prefill {r['prefill_512'] / peer['pp512']:.2f}x its pp512")  # fmt: skip
    path = save("latency", {"read_bandwidth_gbs": bandwidth, "repeats": repeats, "results": results, "llama_cpp": peer})
    print("results:", path)


if __name__ == "__main__":
    main()
