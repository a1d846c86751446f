"""Render docs/benchmarks.md (tables + matplotlib PNGs) from bench/results/*.json.

Each section reads one results file and states the machine, model, dtype and the baseline
that was measured in the same run. A missing file leaves its section saying how to produce it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import RESULTS_DIR, table  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
IMG = DOCS / "img"
MODEL = "SmolLM2-135M-Instruct"


def load(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def machine_line(r: dict, dtype: str = "float32") -> str:
    m = r.get("machine", {})
    where = m.get("cuda") or f"{m.get('cpu', '?')} CPU, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}"
    return f"*{where}; model {MODEL}; {dtype}; measured {m.get('date', '?')}.*"


def figure(name: str, draw: Callable[[plt.Axes], None], width: float = 7) -> str:
    IMG.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(width, 3.6))
    draw(ax)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(IMG / f"{name}.png", dpi=110)
    plt.close(fig)
    return f"![{name}](img/{name}.png)"


def bars(ax, labels: list[str], values: list[float], ylabel: str, title: str) -> None:
    ax.bar(labels, values, color=["#2b7bba" if i == 0 else "#9bbbd4" for i in range(len(values))])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:,.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=8)


def missing(script: str) -> list[str]:
    return [f"_Not measured yet: run `python bench/{script}`._", ""]


# ----- sections --------------------------------------------------------------------------


def throughput() -> list[str]:
    out = ["## Offline throughput (`bench/throughput.py`)", ""]
    r = load("throughput_float32") or load("throughput_bfloat16")
    if not r:
        return out + missing("throughput.py")
    c = r["config"]
    out += [machine_line(r, c["dtype"]), ""]
    out += [f"{c['num_prompts']} prompts of ~{c['prompt_tokens']} tokens, {c['output_tokens']} greedy output tokens each. "
            "Baselines in the same run: transformers `generate` on one left-padded batch, and one request at a time.", ""]  # fmt: skip
    rows = [
        {"system": "radixrt Engine", "output tok/s": r["radixrt"]["tok_s"], "vs": "1.00x"},
        {"system": "transformers, batched + padded", "output tok/s": r["hf_batched"]["tok_s"],
         "vs": f"{r['speedup_vs_hf_batched']:.2f}x slower"},
        {"system": f"transformers, one at a time ({r['hf_sequential']['prompts']} prompts)",
         "output tok/s": r["hf_sequential"]["tok_s"], "vs": f"{r['speedup_vs_hf_sequential']:.2f}x slower"},
    ]  # fmt: skip
    out += [table(rows, ["system", "output tok/s", "vs"]), ""]
    out.append(figure("throughput", lambda ax: bars(ax, ["radixrt", "HF batched", "HF one-by-one"],
                                                    [row["output tok/s"] for row in rows], "output tok/s",
                                                    "Output tokens/s, same run")))  # fmt: skip
    decode = {int(k): v for k, v in r["decode_tok_s"].items()}

    def draw(ax):
        ax.plot(list(decode), list(decode.values()), marker="o")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tok/s")
        ax.set_xscale("log", base=2)
        ax.set_title("Decode throughput vs batch size", fontsize=10)

    out += ["", table([{"batch": b, "decode tok/s": v} for b, v in decode.items()], ["batch", "decode tok/s"]), ""]
    out += [figure("decode_vs_batch", draw), ""]
    p = r["step_profile_b32"]
    out += [f"Step profile at batch 32: {p['step_ms']:.1f} ms per step, of which the model forward is "
            f"{p['forward_ms']:.1f} ms; scheduling, batch building and sampling take {p['python_overhead_ms']:.1f} ms "
            f"(**{p['python_overhead_pct']:.1f}%** of the step).", ""]  # fmt: skip
    return out


def prefix_reuse() -> list[str]:
    out = ["## Prefix reuse (`bench/prefix_reuse.py`)", ""]
    r = load("prefix_reuse")
    if not r:
        return out + missing("prefix_reuse.py")
    out += [machine_line(r, r["config"]["dtype"]), ""]
    out += ["Baseline: the same workload with the radix cache off (`disable_radix_cache=True`), same run. "
            "Optimal hit rate: an unbounded page-aligned cache that sees every request after all earlier ones.", ""]  # fmt: skip
    runs = r["runs"]
    rows = [{"workload": x["workload"], "variant": x["variant"], "total tok/s": x["total_tok_s"],
             "speedup": f"{x['speedup_vs_cache_off']:.2f}x" if x.get("speedup_vs_cache_off") else "",
             "mean TTFT s": x["mean_ttft_s"], "hit rate": f"{x['hit_rate']:.1%}",
             "optimal": f"{x['optimal_hit_rate']:.1%}", "evicted tokens": x["evicted_tokens"]} for x in runs]  # fmt: skip
    out += [table(rows, list(rows[0])), ""]
    workloads = list(dict.fromkeys(x["workload"] for x in runs if "tight" not in x["variant"]))
    variants = ["lpm", "dfs-weight", "fcfs", "cache off"]

    def draw(ax):
        width = 0.2
        for i, v in enumerate(variants):
            vals = [next((x["speedup_vs_cache_off"] or 0 for x in runs if x["workload"] == w and x["variant"] == v), 0)
                    for w in workloads]  # fmt: skip
            ax.bar([j + i * width for j in range(len(workloads))], vals, width, label=v)
        ax.set_xticks([j + 1.5 * width for j in range(len(workloads))], workloads, fontsize=8)
        ax.set_ylabel("throughput vs cache off")
        ax.legend(fontsize=8)
        ax.set_title("Prefix-reuse speedup per workload and policy", fontsize=10)

    out += [figure("prefix_reuse", draw, 8), ""]
    return out


def policy_cost() -> list[str]:
    out = ["## Scheduling cost at thousands waiting (`bench/policy_cost.py`)", ""]
    r = load("policy_cost")
    if not r:
        return out + missing("policy_cost.py")
    out += [machine_line(r), ""]
    out += ["Time to order the waiting queue once (one scheduler step). `tree-walk lpm` matches every request "
            "through the radix tree, as SGLang does (it falls back to FCFS above 128 waiting); radixrt's `lpm` "
            "looks up page hashes instead.", ""]  # fmt: skip
    rows = r["rows"]
    out += [table(rows, list(rows[0])), ""]

    def draw(ax):
        for key in ("lpm ms", "tree-walk lpm ms", "dfs-weight ms", "fcfs ms"):
            ax.plot([x["waiting"] for x in rows], [x[key] for x in rows], marker="o", label=key.removesuffix(" ms"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("waiting requests")
        ax.set_ylabel("ms per step")
        ax.legend(fontsize=8)
        ax.set_title("Ordering cost per scheduler step", fontsize=10)

    return out + [figure("policy_cost", draw), ""]


def page_size() -> list[str]:
    out = ["## Page size (`bench/page_size.py`)", ""]
    r = load("page_size")
    if not r:
        return out + missing("page_size.py")
    out += [machine_line(r, r.get("dtype", "float32")), ""]
    return out + [table(r["rows"], list(r["rows"][0])), ""]


def serving() -> list[str]:
    out = ["## Serving over HTTP (`bench/serve.py`)", ""]
    r = load("serve")
    if not r:
        return out + missing("serve.py")
    s = r["settings"]
    out += [machine_line(r, r["config"]["dtype"]), ""]
    out += [f"Concurrency {s['concurrency']}, {s['max_tokens']} output tokens per request. Baseline: the offline "
            "`Engine` on the same workload in the same run" + (", and the peer server at " + s["peer_url"]
                                                                if s.get("peer_url") else "") + ".", ""]  # fmt: skip
    rows = r["rows"]
    cols = ["workload", "target", "requests", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
            "cached_frac"]  # fmt: skip
    out += [table(rows, cols), ""]
    http = [x for x in rows if "HTTP" in x["target"]]

    def draw(ax):
        labels = [x["workload"] for x in http]
        xs = range(len(labels))
        for off, key in ((-0.3, "ttft_p50_ms"), (-0.1, "ttft_p99_ms"), (0.1, "itl_p50_ms"), (0.3, "itl_p99_ms")):
            ax.bar([x + off for x in xs], [x[key] for x in http], 0.2, label=key.removesuffix("_ms"))
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
        ax.set_title("HTTP latency percentiles", fontsize=10)

    return out + [figure("serve_latency", draw), ""]


def constrained() -> list[str]:
    out = ["## Constrained decoding (`bench/constrained.py`, `bench/grammar_coverage.py`)", ""]
    cov = load("grammar_coverage")
    if cov:
        rows = [{"backend": b, "compiled": v["compiled"], "compiles and always valid": f"{v['coverage']:.1%}",
                 "compile p50 ms": v["compile_ms_p50"], "compile p99 ms": v["compile_ms_p99"]}
                for b, v in cov["summary"].items()]  # fmt: skip
        out += [f"Schema coverage over {cov['files']} JSONSchemaBench schemas (random walks validated with jsonschema):",
                "", table(rows, list(rows[0])), ""]  # fmt: skip
        out.append(figure("grammar_coverage", lambda ax: bars(ax, list(cov["summary"]),
                                                              [100 * v["coverage"] for v in cov["summary"].values()],
                                                              "% of schemas", "Compile and always valid")))  # fmt: skip
        out.append("")
    r = load("constrained")
    if r:
        out += [machine_line(r), ""]
        for key, value in r.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                out += [f"**{key}**", "", table(value, list(value[0])), ""]
    else:
        out += missing("constrained.py")
    return out


def kernels() -> list[str]:
    out = ["## Attention kernels (`bench/kernels.py`)", ""]
    r = load("kernels")
    if not r:
        return out + missing("kernels.py")
    out += [machine_line(r), ""]
    bw = r["copy_bandwidth"]
    out += [f"Paged decode attention, 32 sequences x 1,024 context, 9 heads / 3 KV heads, dim 64, page 16. Lower bound: "
            f"contiguous SDPA (no paging). Machine copy bandwidth measured in the same run: {bw['median_gbs']:.1f} GB/s "
            f"median ({bw['best_gbs']:.1f} best).", ""]  # fmt: skip
    rows = r["decode_attention"]
    out += [table(rows, ["dtype", "kernel", "cold_ms", "speedup_vs_torch", "vs_sdpa", "cold_gbs", "of_copy_bw"]), ""]

    def draw(ax):
        labels = [f"{x['kernel']}\n{x['dtype']}" for x in rows]
        bars(ax, labels, [x["cold_ms"] for x in rows], "ms per layer", "Paged decode attention (lower is better)")

    out += [figure("kernels_decode", draw, 8), ""]
    e2e = r.get("end_to_end_decode", [])
    if e2e:
        out += [table(e2e, ["backend", "dtype", "batch", "tok_s", "step_ms", "vs_torch"]), ""]

        def draw_e2e(ax):
            for backend in dict.fromkeys(x["backend"] for x in e2e):
                pts = [x for x in e2e if x["backend"] == backend]
                ax.plot([x["batch"] for x in pts], [x["tok_s"] for x in pts], marker="o", label=backend)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel("decode tok/s")
            ax.legend(fontsize=8)
            ax.set_title("End-to-end decode per attention backend", fontsize=10)

        out += [figure("kernels_e2e", draw_e2e), ""]
    return out


def programs() -> list[str]:
    out = ["## DSL programs (`bench/programs.py`)", ""]
    r = load("programs")
    if not r:
        return out + missing("programs.py")
    out += [machine_line(r), ""]
    out += ["Baseline: the same program functions as sequential calls with the radix cache off, same run.", ""]
    rows = [{"workload": w["workload"], "programs": w["programs"],
             "radixrt programs/s": w["radixrt"]["programs_per_s"], "baseline programs/s": w["baseline"]["programs_per_s"],
             "speedup": f"{w['speedup']:.2f}x"} for w in r["workloads"]]  # fmt: skip
    out += [table(rows, list(rows[0])), ""]
    out.append(figure("programs", lambda ax: bars(ax, [w["workload"] for w in r["workloads"]],
                                                  [w["speedup"] for w in r["workloads"]], "speedup",
                                                  "DSL on radixrt vs sequential calls, cache off")))  # fmt: skip
    return out + [""]


SECTIONS = [throughput, prefix_reuse, serving, programs, constrained, kernels, policy_cost, page_size]


def render() -> Path:
    lines = [
        "# Benchmarks",
        "",
        "Rendered by `python bench/run_all.py` (or `radixrt bench`) from `bench/results/*.json`. Every number",
        "is compared with a baseline measured in the same run on the same machine; figures state the machine,",
        "model and dtype. Our machines are shared 2-core CPUs: absolute numbers move with load, ratios less so.",
        "",
    ]
    for section in SECTIONS:
        lines += section()
    path = DOCS / "benchmarks.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    print("wrote", render())
