"""Attention kernels: paged decode attention per backend, end-to-end decode per backend, bandwidth.

    nice -n 5 python bench/kernels.py              # everything (~5 min on 2 quiet cores)
    nice -n 5 python bench/kernels.py --quick      # fewer rounds, batch 1/32 only
    nice -n 5 python bench/kernels.py --profile    # where a batch-32 decode step's time goes, per backend
    nice -n 5 python bench/kernels.py --profile --profile-batch 1

1. Copy bandwidth of this machine (a 256 MiB tensor copy: bytes read + bytes written per second).
2. One layer of paged decode attention, 32 sequences x 1,024 keys, the default model's heads (9 query,
   3 KV, dim 64), 16-token pages in shuffled order: native kernel vs the torch reference backend vs
   contiguous SDPA on unpaged [B, H_kv, L, D] tensors (the lower bound: no paging at all) and a
   contiguous matmul + softmax (the better lower bound for bf16, where SDPA is slow on CPU). Eight
   layers' worth of KV rotate so that, as in a real step, no call finds its keys in the cache ("cold");
   "warm" repeats one layer, as MEASURED.md did. Bytes moved = K + V read + q read + out written.
3. End-to-end decode tokens/s through `Engine` at batch 1/8/32/64 per backend: prompts share a
   224-token prefix (cached once) plus 32 tokens each, then 24 greedy tokens; a step's time is taken
   around `Worker.step` for decode-only steps (one Engine per backend, batches alternating between
   them). Bytes per step = weights + the KV read by attention.

Timings interleave the contenders round by round (contention hits all alike) and report medians and
the best round; a wide median/best spread or a high load average marks a contended run.
Table to stdout, JSON to bench/results/kernels.json.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, table  # noqa: E402

from radixrt import _native  # noqa: E402
from radixrt.attention.base import ForwardBatch  # noqa: E402
from radixrt.attention.native import NativeAttention  # noqa: E402
from radixrt.attention.torch_ref import TorchAttention  # noqa: E402
from radixrt.cache.page_pool import KVPool  # noqa: E402
from radixrt.model.config import ModelConfig  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE = 9, 3, 64, 16


def timed_rounds(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Call every fn once per round, in turn; seconds per call."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def copy_bandwidth(rounds: int) -> dict:
    src = torch.randn(64 * 2**20)  # 256 MiB, far beyond any cache
    dst = torch.empty_like(src)
    t = timed_rounds({"copy": lambda: dst.copy_(src)}, rounds)["copy"]
    moved = 2 * src.numel() * src.element_size()
    return {"bytes": moved, "median_gbs": moved / statistics.median(t) / 1e9, "best_gbs": moved / min(t) / 1e9}


def attention_case(dtype: torch.dtype, batch: int, context: int, layers: int, seed: int = 0):
    """A pool of `layers` layers holding `batch` sequences of `context` keys on shuffled pages."""
    rng = random.Random(seed)
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=8,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=8,
        num_layers=layers,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rms_norm_eps=1e-5,
        rope_theta=1e4,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        attention_bias=False,
    )
    per_seq = context // PAGE
    pool = KVPool(config, batch * per_seq, PAGE, dtype)
    for t in pool.k + pool.v:
        t.normal_()
    pages = list(range(pool.num_pages))
    rng.shuffle(pages)
    tables = [pages[i * per_seq : (i + 1) * per_seq] for i in range(batch)]
    slots = [tables[b][-1] * PAGE + PAGE - 1 for b in range(batch)]
    step = ForwardBatch(
        input_ids=torch.zeros(batch, dtype=torch.int64),
        positions=torch.full((batch,), context - 1),
        out_slots=torch.tensor(slots),
        qo_indptr=list(range(batch + 1)),
        prefix_lens=[context - 1] * batch,
        seq_lens=[context] * batch,
        page_tables=tables,
        logits_indices=torch.arange(batch),
        page_size=PAGE,
    )
    q = torch.randn(batch, HEADS, HEAD_DIM).to(dtype)
    kv = torch.randn(batch, KV_HEADS, HEAD_DIM).to(dtype)
    return pool, step, q, kv


def bench_decode_attention(ops, dtype: torch.dtype, rounds: int, batch=32, context=1024, layers=8) -> list[dict]:
    pool, step, q, kv = attention_case(dtype, batch, context, layers)
    backends = {"native": NativeAttention(ops), "torch reference": TorchAttention()}
    steps = {}
    for name, backend in backends.items():
        steps[name] = ForwardBatch(**{**step.__dict__, "backend_state": {}})
        backend.prepare(steps[name], pool)
    contiguous_k = [torch.randn(batch, KV_HEADS, context, HEAD_DIM).to(dtype) for _ in range(layers)]
    contiguous_v = [torch.randn(batch, KV_HEADS, context, HEAD_DIM).to(dtype) for _ in range(layers)]
    q4 = q.view(batch, HEADS, 1, HEAD_DIM)
    group = HEADS // KV_HEADS

    def sdpa(layer):
        return F.scaled_dot_product_attention(q4, contiguous_k[layer], contiguous_v[layer], enable_gqa=True)

    def matmul(layer):  # q grouped per KV head: [B, Hkv, G, D] @ [B, Hkv, D, L]
        qg = q.view(batch, KV_HEADS, group, HEAD_DIM)
        scores = torch.matmul(qg, contiguous_k[layer].transpose(-1, -2)).float() * HEAD_DIM**-0.5
        return torch.matmul(scores.softmax(-1).to(dtype), contiguous_v[layer])

    def rotating(fn):
        counter = [0]

        def call():
            counter[0] += 1
            return fn(counter[0] % layers)

        return call

    contenders = {
        "native": lambda layer: backends["native"].forward(layer, q, kv, kv, steps["native"], pool),
        "torch reference": lambda layer: backends["torch reference"].forward(
            layer, q, kv, kv, steps["torch reference"], pool
        ),
        "contiguous SDPA": sdpa,
        "contiguous matmul": matmul,
    }
    cold = timed_rounds({n: rotating(f) for n, f in contenders.items()}, rounds)
    warm = timed_rounds({n: (lambda f=f: f(0)) for n, f in contenders.items()}, rounds)
    moved = (2 * batch * context * KV_HEADS * HEAD_DIM + 2 * q.numel()) * q.element_size()
    rows = []
    for name in contenders:
        c, w = statistics.median(cold[name]), statistics.median(warm[name])
        rows.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "kernel": name,
                "cold_ms": c * 1e3,
                "cold_best_ms": min(cold[name]) * 1e3,
                "warm_ms": w * 1e3,
                "cold_gbs": moved / c / 1e9,
                "bytes": moved,
            }
        )
    native, ref, sdpa_ms = rows[0]["cold_ms"], rows[1]["cold_ms"], rows[2]["cold_ms"]
    for row in rows:
        row["vs_native"] = row["cold_ms"] / native
    rows[0]["speedup_vs_torch"] = ref / native
    rows[0]["vs_sdpa"] = native / sdpa_ms
    return rows


class StepTimer:
    """Times `Worker.step` calls whose batch is decode-only with `batch` requests."""

    def __init__(self, worker) -> None:
        self.worker, self.batch, self.times, self._decode = worker, 0, [], False
        self._step, self._forward = worker.step, worker.runner.model.forward
        worker.step, worker.runner.model.forward = self.step, self.forward

    def forward(self, batch, *args, **kwargs):
        self._decode = batch.is_decode_only and batch.batch_size == self.batch
        return self._forward(batch, *args, **kwargs)

    def step(self):
        self._decode = False
        start = time.perf_counter()
        out = self._step()
        if self._decode:
            self.times.append(time.perf_counter() - start)
        return out


def bench_end_to_end(
    backends: list[str], batches: list[int], dtype: str, repeats: int, new_tokens: int = 24
) -> list[dict]:
    """One Engine per backend; each batch size runs on every engine in turn, `repeats` times (ABAB)."""
    from radixrt import Engine

    rng = random.Random(0)
    prefix = [rng.randrange(100, 40000) for _ in range(224)]
    params = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    engines = [
        Engine(
            attention_backend=b,
            dtype=dtype,
            max_running_requests=64,
            chunked_prefill_size=4096,
            num_threads=torch.get_num_threads(),
        )
        for b in backends
    ]
    try:
        timers = [StepTimer(e.worker) for e in engines]
        for engine in engines:  # cache the shared prefix
            engine.generate(input_ids=[prefix + [5]], sampling_params=dict(params, max_new_tokens=2, min_new_tokens=2))
        rows = []
        for b in batches:
            times: dict[int, list[float]] = {i: [] for i in range(len(engines))}
            for _ in range(repeats):
                for i, (engine, timer) in enumerate(zip(engines, timers)):
                    prompts = [prefix + [rng.randrange(100, 40000) for _ in range(32)] for _ in range(b)]
                    timer.batch, timer.times = b, []
                    engine.generate(input_ids=prompts, sampling_params=params)
                    times[i] += timer.times
            for i, engine in enumerate(engines):
                config, elt = engine.worker.model_config, torch.finfo(engine.worker.runner.dtype).bits // 8
                weights = sum(p.numel() * p.element_size() for p in engine.worker.runner.model.parameters())
                kv = b * (224 + 32 + new_tokens // 2) * config.kv_bytes_per_token(elt)
                step = statistics.median(times[i])
                rows.append(
                    {
                        "backend": engine.worker.runner.backend.name,
                        "dtype": dtype,
                        "batch": b,
                        "tok_s": b / step,
                        "step_ms": step * 1e3,
                        "best_step_ms": min(times[i]) * 1e3,
                        "steps": len(times[i]),
                        "gbs": (weights + kv) / step / 1e9,
                        "kv_mb": kv / 2**20,
                    }
                )
        return rows
    finally:
        for engine in engines:
            engine.shutdown()


def profile_decode_step(backend: str, batch: int = 32) -> str:
    """torch.profiler over decode steps at `batch`; attention is wrapped in one labelled range."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from radixrt import Engine

    rng = random.Random(0)
    prefix = [rng.randrange(100, 40000) for _ in range(224)]
    with Engine(attention_backend=backend, max_running_requests=64, chunked_prefill_size=4096) as engine:
        worker = engine.worker
        attn = worker.runner.backend.forward

        def labelled(*args, **kwargs):
            with record_function("attention (backend.forward)"):
                return attn(*args, **kwargs)

        worker.runner.backend.forward = labelled
        timer = StepTimer(worker)
        timer.batch = batch
        original = timer.step

        def step():  # profile only decode-only steps after a few warm-up ones
            if len(timer.times) < 3:
                return original()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = original()
            if timer._decode:
                profiles.append(prof)
            return out

        profiles: list = []
        worker.step = step
        params = {"max_new_tokens": 12, "min_new_tokens": 12, "temperature": 0, "ignore_eos": True}
        engine.generate(
            input_ids=[prefix + [rng.randrange(100, 40000) for _ in range(32)] for _ in range(batch)],
            sampling_params=params,
        )
    events = profiles[len(profiles) // 2].key_averages()
    header = (
        f"{backend} backend, decode step at batch {batch}: median step {statistics.median(timer.times) * 1e3:.1f} ms"
    )
    return header + "\n" + events.table(sort_by="cpu_time_total", row_limit=25)


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print where a decode step's time goes, per backend")
    parser.add_argument("--profile-batch", type=int, default=32)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--e2e-dtypes", default="float32", help="comma-separated, e.g. float32,bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default="kernels", help="results file name under bench/results/")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = _native.load()
    if ops is None:
        sys.exit(f"native kernels unavailable: {_native.load_error()}")
    if args.profile:
        for backend in ("torch", "native"):
            print(profile_decode_step(backend, args.profile_batch), "\n")
        return
    rounds = 8 if args.quick else 25
    load_before = load_average()
    bandwidth = copy_bandwidth(rounds)
    print(
        f"copy bandwidth: {bandwidth['median_gbs']:.1f} GB/s median, {bandwidth['best_gbs']:.1f} best (read + write)\n"
    )
    kernels = []
    for dtype in (torch.float32, torch.bfloat16):
        kernels += bench_decode_attention(ops, dtype, rounds)
    for row in kernels:
        row["of_copy_bw"] = row["cold_gbs"] / bandwidth["median_gbs"]
    print("paged decode attention, one layer: 32 seqs x 1,024 keys, 9/3 heads, dim 64, 16-token pages")
    print(
        table(kernels, ["dtype", "kernel", "cold_ms", "cold_best_ms", "warm_ms", "vs_native", "cold_gbs", "of_copy_bw"])
    )
    e2e = []
    if not args.skip_e2e:
        batches = [1, 32] if args.quick else [1, 8, 32, 64]
        for dtype in args.e2e_dtypes.split(","):
            e2e += bench_end_to_end(["torch", "native"], batches, dtype, repeats=1 if args.quick else 2)
        for row in e2e:
            base = next(
                r for r in e2e if r["backend"] == "torch" and r["batch"] == row["batch"] and r["dtype"] == row["dtype"]
            )
            row["vs_torch"] = row["tok_s"] / base["tok_s"]
        print("\nend-to-end decode through Engine (default model, ~270-token contexts, 24 new tokens)")
        print(table(e2e, ["dtype", "backend", "batch", "tok_s", "vs_torch", "step_ms", "best_step_ms", "gbs"]))
    load_after = load_average()
    contended = load_before > 1.0 or load_after > torch.get_num_threads() + 1.0  # others were running too
    print(
        f"\ntorch threads: {torch.get_num_threads()}; load average before/after: {load_before:.1f}/{load_after:.1f}"
        + (" -- CONTENDED, treat as noisy" if contended else "")
    )
    path = save(
        args.out,
        {
            "copy_bandwidth": bandwidth,
            "decode_attention": kernels,
            "end_to_end_decode": e2e,
            "load_average": [load_before, load_after],
            "contended": contended,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
