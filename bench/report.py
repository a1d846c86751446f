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
    found = [r for r in (load("throughput_float32"), load("throughput_bfloat16")) if r]
    if not found:
        return out + missing("throughput.py")
    for r in found:
        out += throughput_one(r)
    return out


def throughput_one(r: dict) -> list[str]:
    c = r["config"]
    suffix = "" if c["dtype"] == "float32" else f"_{c['dtype']}"
    out = [f"### {c['dtype']}", "", machine_line(r, c["dtype"]), ""]
    out += [
        f"{c['num_prompts']} prompts of ~{c['prompt_tokens']} tokens, {c['output_tokens']} greedy output tokens each. "
        "Baselines in the same run: transformers `generate` on one left-padded batch (alternated with radixrt, "
        f"best of {c.get('repeats', 1)} each), and one request at a time.",
        "",
    ]
    rows = [
        {"system": "radixrt Engine", "output tok/s": r["radixrt"]["tok_s"], "vs": "1.00x"},
        {
            "system": "transformers, batched + padded",
            "output tok/s": r["hf_batched"]["tok_s"],
            "vs": f"{r['speedup_vs_hf_batched']:.2f}x slower",
        },
        {
            "system": f"transformers, one at a time ({r['hf_sequential']['prompts']} prompts)",
            "output tok/s": r["hf_sequential"]["tok_s"],
            "vs": f"{r['speedup_vs_hf_sequential']:.2f}x slower",
        },
    ]
    out += [table(rows, ["system", "output tok/s", "vs"]), ""]
    out.append(
        figure(
            "throughput" + suffix,
            lambda ax: bars(
                ax,
                ["radixrt", "HF batched", "HF one-by-one"],
                [row["output tok/s"] for row in rows],
                "output tok/s",
                f"Output tokens/s, same run, {c['dtype']}",
            ),
        )
    )
    decode = {int(k): v for k, v in r["decode_tok_s"].items()}

    def draw(ax):
        ax.plot(list(decode), list(decode.values()), marker="o")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tok/s")
        ax.set_xscale("log", base=2)
        ax.set_title(f"Decode throughput vs batch size, {c['dtype']}", fontsize=10)

    out += ["", table([{"batch": b, "decode tok/s": v} for b, v in decode.items()], ["batch", "decode tok/s"]), ""]
    out += [figure("decode_vs_batch" + suffix, draw), ""]
    p = r["step_profile_b32"]
    out += [
        f"Step profile at batch 32: {p['step_ms']:.1f} ms per step, of which the model forward is "
        f"{p['forward_ms']:.1f} ms; scheduling, batch building and sampling take {p['python_overhead_ms']:.1f} ms "
        f"(**{p['python_overhead_pct']:.1f}%** of the step).",
        "",
    ]
    return out


def prefix_reuse() -> list[str]:
    out = ["## Prefix reuse (`bench/prefix_reuse.py`)", ""]
    r = load("prefix_reuse")
    if not r:
        return out + missing("prefix_reuse.py")
    out += [machine_line(r, r["config"]["dtype"]), ""]
    out += [
        "Baseline: the same workload with the radix cache off (`disable_radix_cache=True`), same run. "
        "Optimal hit rate: an unbounded page-aligned cache that sees every request after all earlier ones.",
        "",
    ]
    runs = r["runs"]
    rows = [
        {
            "workload": x["workload"],
            "variant": x["variant"],
            "total tok/s": x["total_tok_s"],
            "speedup": f"{x['speedup_vs_cache_off']:.2f}x" if x.get("speedup_vs_cache_off") else "",
            "mean TTFT s": x["mean_ttft_s"],
            "hit rate": f"{x['hit_rate']:.1%}",
            "optimal": f"{x['optimal_hit_rate']:.1%}",
            "evicted tokens": x["evicted_tokens"],
            "preemptions": x.get("preemptions", 0),
            "measured": x.get("measured", ""),
        }
        for x in runs
    ]
    columns = list(rows[0])
    if len({x.get("measured") for x in runs}) < 2:  # one run: the machine line has its date
        columns.remove("measured")
    out += [table(rows, columns), ""]
    if r.get("tight_kv_tokens"):
        out += [
            f"*Tight KV*: workload (b) on a pool of {r['tight_kv_tokens']:,} tokens, sized from the unbounded "
            "run's measured footprint to hold the shared system prompt plus a third of the conversations; "
            "its speedup is against cache off with the full pool.",
            "",
        ]
    workloads = list(dict.fromkeys(x["workload"] for x in runs if "tight" not in x["variant"]))
    variants = ["lpm", "dfs-weight", "fcfs", "cache off"]

    def draw(ax):
        width = 0.2
        for i, v in enumerate(variants):
            vals = [
                next((x["speedup_vs_cache_off"] or 0 for x in runs if x["workload"] == w and x["variant"] == v), 0)
                for w in workloads
            ]
            ax.bar([j + i * width for j in range(len(workloads))], vals, width, label=v)
        ax.set_xticks([j + 1.5 * width for j in range(len(workloads))], workloads, fontsize=8)
        ax.set_ylabel("throughput vs cache off")
        ax.legend(fontsize=8)
        ax.set_title("Prefix-reuse speedup per workload and policy", fontsize=10)

    out += [figure("prefix_reuse", draw, 8), ""]
    tight = [x for x in runs if "tight" in x["variant"]]
    if tight:
        labels = [x["variant"].removesuffix(" (tight KV)") for x in tight]
        out += [
            figure(
                "prefix_reuse_tight",
                lambda ax: bars(
                    ax,
                    labels + ["optimal"],
                    [100 * x["hit_rate"] for x in tight] + [100 * tight[0]["optimal_hit_rate"]],
                    "hit rate %",
                    "(b) multi-turn under a tight KV pool",
                ),
            ),
            "",
        ]
    return out


def policy_cost() -> list[str]:
    out = ["## Scheduling cost at thousands waiting (`bench/policy_cost.py`)", ""]
    r = load("policy_cost")
    if not r:
        return out + missing("policy_cost.py")
    out += [machine_line(r), ""]
    out += [
        "Time to order the waiting queue once (one scheduler step). `tree-walk lpm` matches every request "
        "through the radix tree, as SGLang does (it falls back to FCFS above 128 waiting); radixrt's `lpm` "
        "looks up page hashes instead.",
        "",
    ]
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
    out += [
        f"Decode at batch 32 (32 prompts of ~200 tokens): {r.get('rounds', 1)} round-robin passes over the page "
        "sizes, best kept. Turn-2 hit rate: the share of a second chat turn's prompt served from the cache "
        "(a hit is rounded down to whole pages).",
        "",
    ]
    return out + [table(r["rows"], list(r["rows"][0])), ""]


def serving() -> list[str]:
    out = ["## Serving over HTTP (`bench/serve.py`)", ""]
    r = load("serve")
    if not r:
        return out + missing("serve.py")
    s = r["settings"]
    out += [machine_line(r, r["config"]["dtype"]), ""]
    out += [
        f"Concurrency {s['concurrency']}, {s['max_tokens']} output tokens per request. Baseline: the offline "
        "`Engine` on the same workload in the same run"
        + (", and the peer server at " + s["peer_url"] if s.get("peer_url") else "")
        + ".",
        "",
    ]
    if s.get("peer_note"):
        out += [f"Peer: {s['peer_note']}.", ""]
    out += [
        "To add a llama.cpp peer on the same GGUF (optional): build llama.cpp's `llama-server`, start it with "
        "`llama-server -m $(python -c 'from radixrt.model.loader import default_gguf_path; "
        "print(default_gguf_path())') -np 8 -kvu -t 2 -c 16384 --port 8080`, and run "
        '`python bench/serve.py --peer-url http://127.0.0.1:8080 --peer-note "llama.cpp <version>, ..."`.',
        "",
    ]
    rows = r["rows"]
    cols = [
        "workload",
        "target",
        "requests",
        "output_tok_s",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "itl_p50_ms",
        "itl_p99_ms",
        "cached_frac",
    ]
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
        rows = [
            {
                "backend": b,
                "compiled": v["compiled"],
                "compiles and always valid": f"{v['coverage']:.1%}",
                "compile p50 ms": v["compile_ms_p50"],
                "compile p99 ms": v["compile_ms_p99"],
            }
            for b, v in cov["summary"].items()
        ]
        out += [
            f"Schema coverage over {cov['files']} JSONSchemaBench schemas (random walks validated with jsonschema):",
            "",
            table(rows, list(rows[0])),
            "",
        ]
        out.append(
            figure(
                "grammar_coverage",
                lambda ax: bars(
                    ax,
                    list(cov["summary"]),
                    [100 * v["coverage"] for v in cov["summary"].values()],
                    "% of schemas",
                    "Compile and always valid",
                ),
            )
        )
        out.append("")
    r = load("constrained")
    if r:
        out += [machine_line(r), ""]
        for key, value in r.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                columns = list(dict.fromkeys(k for row in value for k in row))  # later rows add columns
                out += [f"**{key}**", "", table(value, columns), ""]
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
    out += [
        f"Paged decode attention, 32 sequences x 1,024 context, 9 heads / 3 KV heads, dim 64, page 16. Lower bound: "
        f"contiguous SDPA (no paging). Machine copy bandwidth measured in the same run: {bw['median_gbs']:.1f} GB/s "
        f"median ({bw['best_gbs']:.1f} best).",
        "",
    ]
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
    rows = [
        {
            "workload": w["workload"],
            "programs": w["programs"],
            "radixrt programs/s": w["radixrt"]["programs_per_s"],
            "baseline programs/s": w["baseline"]["programs_per_s"],
            "speedup": f"{w['speedup']:.2f}x",
        }
        for w in r["workloads"]
    ]
    out += [table(rows, list(rows[0])), ""]
    out.append(
        figure(
            "programs",
            lambda ax: bars(
                ax,
                [w["workload"] for w in r["workloads"]],
                [w["speedup"] for w in r["workloads"]],
                "speedup",
                "DSL on radixrt vs sequential calls, cache off",
            ),
        )
    )
    return out + [""]


def headline_rows() -> list[dict]:
    """One line per benchmark: the number a newcomer wants, with its same-run baseline."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        t = load(f"throughput_{dtype}")
        if t:
            rows.append(
                {
                    "what": f"offline throughput, 64 prompts, {dtype}",
                    "radixrt": f"{t['radixrt']['tok_s']:.0f} tok/s",
                    "baseline (same run)": f"transformers batched {t['hf_batched']['tok_s']:.0f} tok/s "
                    f"({t['speedup_vs_hf_batched']:.2f}x); one at a time "
                    f"{t['hf_sequential']['tok_s']:.1f} ({t['speedup_vs_hf_sequential']:.1f}x)",
                }
            )
    pr = load("prefix_reuse")
    if pr and not pr["config"].get("quick"):
        runs = {(x["workload"], x["variant"]): x for x in pr["runs"]}
        for w in ("a few-shot", "b multi-turn", "c tree-of-thought", "d control"):
            x = runs.get((w, "lpm"))
            if x:
                rows.append(
                    {
                        "what": f"prefix reuse: {w[2:]}",
                        "radixrt": f"hit rate {x['hit_rate']:.0%}",
                        "baseline (same run)": f"{x['speedup_vs_cache_off']:.2f}x the throughput of cache off",
                    }
                )
        tight = {v: x for (w, v), x in runs.items() if "tight" in v}
        if tight:
            rows.append(
                {
                    "what": "multi-turn, KV for a third of the chats",
                    "radixrt": " / ".join(f"{v.split()[0]} {x['hit_rate']:.0%}" for v, x in tight.items()),
                    "baseline (same run)": f"hit rates; optimal {next(iter(tight.values()))['optimal_hit_rate']:.0%}",
                }
            )
    sv = load("serve")
    if sv:
        for x in sv["rows"]:
            if x["workload"] in ("multi-turn-chat", "few-shot") and x["target"] == "radixrt HTTP":
                peer = next(
                    (p for p in sv["rows"] if p["workload"] == x["workload"] and p["target"].startswith("peer")), None
                )
                rows.append(
                    {
                        "what": f"{x['workload']} over HTTP, {sv['settings']['concurrency']} clients",
                        "radixrt": f"{x['output_tok_s']:.0f} output tok/s, TTFT p50/p99 "
                        f"{x['ttft_p50_ms']:,.0f}/{x['ttft_p99_ms']:,.0f} ms",
                        "baseline (same run)": f"llama.cpp server {peer['output_tok_s']:.0f} tok/s, TTFT p50/p99 "
                        f"{peer['ttft_p50_ms']:,.0f}/{peer['ttft_p99_ms']:,.0f} ms"
                        if peer
                        else "-",
                    }
                )
    c = load("constrained")
    if c:
        th = {(x["config"], x["batch"]): x for x in c["throughput"]}
        on, off = th.get(("json_schema", 16)), th.get(("unconstrained (same lengths)", 16))
        jf = th.get(("json_schema + jump-forward", 16))
        if on and off:
            rows.append(
                {
                    "what": "JSON-schema output, batch 16",
                    "radixrt": f"{on['tok_s']:.0f} tok/s, {on['valid']} valid"
                    + (f"; jump-forward {jf['tok_s']:.0f} tok/s" if jf else ""),
                    "baseline (same run)": f"unconstrained {off['tok_s']:.0f} tok/s",
                }
            )
    cov = load("grammar_coverage")
    if cov:
        best = cov["summary"].get("llguidance")
        others = ", ".join(f"{b} {v['coverage']:.0%}" for b, v in cov["summary"].items() if b != "llguidance")
        rows.append(
            {
                "what": f"JSON schemas enforced ({cov['files']:,} real schemas)",
                "radixrt": f"llguidance {best['coverage']:.1%}",
                "baseline (same run)": others,
            }
        )
    pg = load("programs")
    if pg:
        for x in pg["workloads"][:2]:
            rows.append(
                {
                    "what": f"DSL program: {x['workload']}",
                    "radixrt": f"{x['radixrt']['programs_per_s']:.1f} programs/s",
                    "baseline (same run)": f"{x['speedup']:.1f}x sequential cache-off calls",
                }
            )
    k = load("kernels")
    if k:
        d = next((x for x in k["decode_attention"] if x["kernel"] == "native" and x["dtype"] == "float32"), None)
        if d:
            rows.append(
                {
                    "what": "decode attention kernel (32 x 1,024, fp32)",
                    "radixrt": f"{d['cold_ms']:.1f} ms",
                    "baseline (same run)": f"{d['speedup_vs_torch']:.1f}x the torch reference, "
                    f"{d['vs_sdpa']:.2f}x contiguous SDPA",
                }
            )
    return rows


def headline() -> list[str]:
    rows = headline_rows()
    if not rows:
        return []
    return ["## At a glance", "", table(rows, ["what", "radixrt", "baseline (same run)"]), ""]


def update_readme(rows: list[dict]) -> None:
    """Replace the README's results table (between its two markers) with the rendered one."""
    readme = DOCS.parent / "README.md"
    text = readme.read_text()
    start, end = "<!-- headline:start -->", "<!-- headline:end -->"
    if start in text and end in text and rows:
        head, rest = text.split(start, 1)
        block = table(rows, ["what", "radixrt", "baseline (same run)"])
        readme.write_text(f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}")


SECTIONS = [headline, throughput, prefix_reuse, serving, programs, constrained, kernels, policy_cost, page_size]


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
    update_readme(headline_rows())
    return path


if __name__ == "__main__":
    print("wrote", render())
