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


def machine_line(r: dict, dtype: str = "float32", model: str = MODEL) -> str:
    m = r.get("machine", {})
    where = m.get("cuda") or f"{m.get('cpu', '?')} CPU, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}"
    return f"*{where}; model {model}; {dtype}; measured {m.get('date', '?')}.*"


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


def grouped(ax, groups: list[str], series: list[str], value: Callable[[str, str], float]) -> None:
    """One cluster of bars per group, one bar per series in each."""
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, [value(g, name) for g in groups], width, label=name)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)


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


LATENCY_NOTES = {
    "default": "`default` computes in bf16 on the GGUF's own 4-bit weights.",
    "bf16-eager": "`bf16-eager` runs the forward op by op from Python instead of the fused decoder.",
    "int8": "`int8` and `int4` are requantized from bf16.",
}


def latency() -> list[str]:
    out = ["## Single-stream latency (`bench/latency.py`)", ""]
    r = load("latency")
    if not r:
        return out + missing("latency.py")
    res, peer = r["results"], r.get("llama_cpp")
    out += [machine_line(r, "dtype and weights per configuration"), ""]
    out += [
        "Through the in-process `Engine` (what a DSL program or an agent loop sees): decode tok/s of one "
        "request (streamed, from its first token to its last) and of batches of 8 and 32; prefill tok/s of one "
        "512-token prompt with the cache off; TTFT of a 2,000-token prompt whose first 1,984 tokens are cached. "
        "`b1 GB/s`: the weight bytes a decode step reads times the batch-1 rate, against the machine's read "
        f"bandwidth measured in the same run ({r['read_bandwidth_gbs']:.1f} GB/s). "
        + (f"Configurations alternate, best of {r['repeats']} rounds." if r["repeats"] > 1 else "One round.")
        + "".join(f" {note}" for name, note in LATENCY_NOTES.items() if name in res),
        "",
    ]
    if peer:
        out += [
            f"Baseline in the same run: llama.cpp's `llama-bench` (build {peer.get('build', '?')}) on the same "
            "GGUF, 2 threads: tg128 (128 generated tokens, batch 1) beside our batch-1 decode, pp512 beside our "
            "512-token prefill"
            + (f"; run in each round, best of {peer['rounds']}." if peer.get("rounds") else ", run once."),
            "",
        ]
    else:
        out += ["No llama.cpp baseline in this run: `llama-bench` was not on PATH (see the top of this page).", ""]
    rows = [
        {
            "config": name,
            "dtype": x["dtype"],
            "weights": x["quantization"].replace("none", "unquantized"),
            "weight MiB": x["weight_mb"],
            "decode b1 tok/s": x["decode_b1"],
            "b1 GB/s": x["decode_b1_gbs"],
            "b1 vs llama.cpp": f"{x['decode_b1'] / peer['tg128']:.2f}x" if peer else "",
            "decode b8 tok/s": x["decode_b8"],
            "decode b32 tok/s": x["decode_b32"],
            "prefill 512 tok/s": x["prefill_512"],
            "TTFT 2,000 cached ms": x["ttft_cached_2000_ms"],
        }
        for name, x in res.items()
    ]
    if peer:
        rows.append(
            {
                "config": "llama.cpp llama-bench",
                "weights": "gguf",
                "decode b1 tok/s": peer["tg128"],
                "b1 vs llama.cpp": "1.00x",
                "prefill 512 tok/s": peer["pp512"],
            }
        )
    columns = list(rows[0])
    if not peer:
        columns.remove("b1 vs llama.cpp")
    out += [table(rows, columns), ""]
    names = list(res) + (["llama.cpp"] if peer else [])
    series = [
        (
            "decode, batch 1 (llama.cpp: tg128)",
            [x["decode_b1"] for x in res.values()] + ([peer["tg128"]] if peer else []),
        ),
        (
            "prefill, 512 tokens (llama.cpp: pp512)",
            [x["prefill_512"] for x in res.values()] + ([peer["pp512"]] if peer else []),
        ),
    ]

    def draw(ax):
        for i, (label, values) in enumerate(series):
            xs = [j + (i - 0.5) * 0.4 for j in range(len(names))]
            ax.bar(xs, values, 0.4, label=label)
            for x, v in zip(xs, values):
                ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("tok/s")
        ax.legend(fontsize=8)
        ax.set_title("One request: decode and prefill, same run", fontsize=10)

    return out + [figure("latency", draw, 8), ""]


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
        "Time to order the waiting queue once (one scheduler step, the first "
        f"{r.get('candidates', 256)} candidates), on a tree of 1,000 cached ~1,000-token sequences. "
        "`tree-walk lpm` matches every request through the radix tree, as SGLang does (it falls back to FCFS "
        "above 128 waiting); radixrt's `lpm` keeps each waiting request's cached length current as the cache "
        "changes, so a step pops its candidates off a heap: `upkeep` is what a step's cache changes cost that "
        "bookkeeping (beyond the changes themselves, `cache`), `full re-rank` the previous lpm (every request "
        "looked up by its page hashes and sorted). `enqueue` and `hash once` are paid once per request, on "
        "arrival, for all of them together.",
        "",
    ]
    rows = r["rows"]
    columns = ["waiting", "lpm ms", "upkeep ms", "full re-rank ms", "tree-walk lpm ms", "fcfs ms", "dfs-weight ms",
               "lpm enqueue ms", "hash once ms", "cache ms"]  # fmt: skip
    out += [table(rows, [c for c in columns if c in rows[0]] or list(rows[0])), ""]

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
        "To add a llama.cpp peer on the same GGUF (optional): build `llama-server` as at the top of this page, "
        f"start it with `{LLAMA_CPP_DIR}/build/bin/llama-server -m $(python -c "
        "'from radixrt.model.loader import default_gguf_path; "
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


def speculative() -> list[str]:
    out = ["## Speculative decoding (`bench/speculative.py`)", ""]
    found = [r for r in (load("speculative"), load("speculative_float32")) if r]
    if not found:
        return out + missing("speculative.py")
    for r in found:
        a = r["args"]
        dtype = "bfloat16 (auto on this CPU)" if a["dtype"] == "auto" else a["dtype"]
        if len(found) > 1:
            out += [f"### {dtype}", ""]
        out += [machine_line(r, dtype), ""]
        out += [
            f"Greedy decode tok/s with drafts against no speculation, the same prompts in the same round: `ngram` "
            "and `ngram+cache` run the defaults (bf16, the GGUF's 4-bit weights) against `off`; `draft-int4` runs "
            "a target with bf16 weights against `off-bf16`; "
            f"configurations alternate, best of {a['repeats']} rounds; at most {a['max_new_tokens']} new tokens per "
            "request, each streamed on its own thread (tok/s from the moment every request has its first token). "
            "Batch B runs B variants of a workload at once. Workloads: `json` extracts a hotel's details from a "
            "passage under a JSON schema, `quotes` summarises an article quoting sentences word for word, `agent` "
            "re-emits a tool's output, `free` writes a story (nothing to copy: the control). `ngram` drafts from "
            "the request's own tokens, `ngram+cache` also from the radix cache, `draft-int4` from a draft model "
            "quantized to int4. Accept rate: drafts kept / drafted; accept length: tokens per verify step "
            "(SGLang's); identical: outputs equal to the baseline's (with 4-bit weights a row's logits do not "
            "depend on the other rows of a decode or verify step; at batch 8 and 32 prompts that arrive together "
            "share a prefill chunk of 128+ rows, dequantized for torch's GEMM, so how they are grouped, which "
            "varies run to run, can move a near-tie: `--enable-deterministic-inference` removes that; with bf16 "
            "weights torch's GEMM rounds a multi-row forward differently from one row). Each round starts from an "
            "empty cache, "
            "so `ngram+cache` can only add drafts from the other requests of its batch.",
            "",
        ]
        draft = r["configs"].get("draft-int4", {}).get("speculative_draft_model_path", "")
        if MODEL in draft:
            out += [
                "The draft model here is the target's own GGUF at int4: it agrees with the target almost always, "
                "so `draft-int4` shows the mechanism's cost at near-perfect drafts, not what a smaller draft "
                "model would give.",
                "",
            ]
        rows = [
            {
                "workload": x["workload"],
                "batch": x["batch"],
                "config": x["config"],
                "tok/s": x["tok_s"],
                "speed-up": f"{x['speedup']:.2f}x",
                "accept rate": f"{x['accept_rate']:.0%}" if x["config"] != "off" else "",
                "accept length": x["accept_length"],
                "identical": x["identical"],
            }
            for x in r["rows"]
        ]
        out += [table(rows, list(rows[0])), ""]
        batch = min(x["batch"] for x in r["rows"])
        at = {(x["workload"], x["config"]): x["speedup"] for x in r["rows"] if x["batch"] == batch}
        workloads = list(dict.fromkeys(w for w, _ in at))
        configs = [c for c in dict.fromkeys(c for _, c in at) if c != "off"]

        def draw(ax, at=at, workloads=workloads, configs=configs, batch=batch):
            grouped(ax, workloads, configs, lambda w, c: at.get((w, c), 0))
            ax.axhline(1, color="grey", linewidth=0.8)
            ax.set_ylabel("tok/s vs no speculation")
            ax.legend(fontsize=8)
            ax.set_title(f"Speculative decoding speed-up at batch {batch}, same run", fontsize=10)

        suffix = "" if a["dtype"] == "auto" else f"_{a['dtype']}"
        out += [figure("speculative" + suffix, draw), ""]
    return out + speculative_paired()


def speculative_paired() -> list[str]:
    r = load("speculative_paired")
    out = ["### On against off, paired (`--paired`)", ""]
    if not r:
        return out + missing("speculative.py --paired")
    out += [
        machine_line(r, "bfloat16 (auto on this CPU)"),
        "",
        "Two workers in one process, the defaults with and without n-gram drafts, run the same requests from an "
        "empty cache round after round in ABBA order; each round gives one ratio of decode tok/s (ngram / off), "
        "reported as the median over the rounds with a bootstrap 95% interval of that median. This answers "
        "what best-of-a-few rounds cannot on a machine whose speed wanders 10-25% within the hour: is a workload "
        "faster or slower with drafts, and by how much. At most 256 new tokens per request.",
        "",
    ]
    rows = [
        {
            "workload": x["workload"], "batch": x["batch"], "rounds": x["rounds"], "off tok/s": x["off_tok_s"],
            "ngram tok/s": x["ngram_tok_s"], "ngram / off": f"{x['ratio']:.2f}x",
            "95% interval": f"{x['ci95_low']:.2f}-{x['ci95_high']:.2f}", "identical": x["identical"],
        }  # fmt: skip
        for x in r["rows"]
    ]
    out += [table(rows, list(rows[0])), ""]

    def draw(ax, xs=r["rows"]):
        labels = [f"{x['workload']} b{x['batch']}" for x in xs]
        mid = [x["ratio"] for x in xs]
        err = [[m - x["ci95_low"] for m, x in zip(mid, xs)], [x["ci95_high"] - m for m, x in zip(mid, xs)]]
        ax.bar(labels, mid, yerr=err, capsize=3, color="#2b7bba")
        ax.axhline(1, color="grey", linewidth=0.8)
        ax.axhline(0.95, color="grey", linewidth=0.8, linestyle="--")
        ax.set_ylabel("ngram / off (median, 95%)")
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title("N-gram drafts against none, paired rounds in one process", fontsize=10)

    return out + [figure("speculative_paired", draw), ""]


def kv_tiers() -> list[str]:
    out = ["## KV tiers: memory, disk, restart (`bench/kv_tiers.py`)", ""]
    r = load("kv_tiers")
    if not r:
        return out + missing("kv_tiers.py")
    c, rows = r["config"], r["rows"]
    out += [machine_line(r, rows[0]["dtype"]), ""]
    out += [
        f"{c['sessions']} agent sessions, each a 256-token system prompt shared by all and its own "
        f"{c['history']:,}-token history: every session's first turn, then {c['rounds']} returning "
        f"round{'s' * (c['rounds'] != 1)} in a shuffled order (the history so far, a {c['user']}-token message, "
        f"{c['gen']} generated tokens), one request at a time. The sessions' KV ({c['kv_tokens']:,} tokens) is "
        f"{c['kv_tokens'] / c['pool_tokens']:.1f}x the memory pool ({c['pool_tokens']:,} tokens). Baselines in the "
        "same run: the same pool without the disk tier (a returning session recomputes its history) and a pool "
        "that holds everything (the hit-rate ceiling). Hit rate and TTFT are the returning turns'. Warm restart: "
        "a fresh engine's first request, with the tier the first engine left on disk and without. Design: "
        "[kv_tiers.md](kv_tiers.md).",
        "",
    ]
    table_rows = [
        {
            "variant": x["variant"],
            "pool tokens": f"{x['pool_tokens']:,}",
            "hit rate": f"{x['hit_rate']:.1%}",
            "tok/s": x["tok_s"],
            "TTFT p50 ms": x["return_ttft_p50_ms"],
            "TTFT p90 ms": x["return_ttft_p90_ms"],
            "disk hit tokens": f"{x['disk_hit_tokens']:,}",
            "evicted tokens": f"{x['evicted_tokens']:,}",
        }
        for x in rows
    ]
    out += [table(table_rows, list(table_rows[0])), ""]
    restarts = [
        {
            "warm restart": x["variant"].removeprefix("restart, "),
            "prompt tokens": f"{x['return_prompt_tokens']:,}",
            "hit rate": f"{x['hit_rate']:.1%}",
            "first TTFT ms": x["first_ttft_ms"],
        }
        for x in r.get("restarts", [])
    ]
    if restarts:
        out += [table(restarts, list(restarts[0])), ""]
    labels = [x["variant"] for x in rows] + [x["variant"] for x in r.get("restarts", [])]
    values = [x["return_ttft_p50_ms"] for x in rows] + [x["first_ttft_ms"] for x in r.get("restarts", [])]
    out.append(
        figure(
            "kv_tiers",
            lambda ax: bars(ax, labels, values, "ms", "TTFT of a returning session (p50), and of a warm restart"),
            8,
        )
    )
    return out + [""]


def scaleout() -> list[str]:
    out = ["## Scaling out on one machine (`bench/scaleout.py`)", ""]
    r = load("scaleout")
    if not r or not ({"tp", "dp"} & set(r)):
        return out + missing("scaleout.py tp") + missing("scaleout.py dp")
    out += [
        machine_line(r, "dtype per model")
        + " The date is the last section's; each section gives the load average while it ran. "
        "Discussion: [scaling.md](scaling.md).",
        "",
    ]
    tp = r.get("tp")
    if tp:
        out += [
            "### Tensor parallelism (`scaleout.py tp`)",
            "",
            "The decode step of a `ModelRunner` at tp=2 (one torch thread per rank, collectives over loopback "
            "gloo) against tp=1 with all the threads, eager and fused, same run. Random-weight checkpoints: a "
            "tiny one and one of the default model's sizes with 8 heads of 72 and 2 KV heads (its 9 and 3 do "
            f"not split over 2 ranks). {tp['context']} tokens of KV per sequence, {tp['rounds']} rounds of "
            f"{tp['steps']} steps, each point's best round (median step; `best ms` its fastest single step); load "
            f"average {tp['load_average'][0]:.1f}. On a CPU the ranks share one memory bus and each step adds "
            "2 + 2 x layers + 1 collectives: this measures the plumbing, not a speed-up.",
            "",
            table(tp["rows"], ["model", "setup", "threads per rank", "batch", "step ms", "best ms", "tok/s"]),
            "",
        ]
    else:
        out += ["### Tensor parallelism (`scaleout.py tp`)", ""] + missing("scaleout.py tp")
    dp = r.get("dp")
    out += ["### Data parallelism behind sglang-router (`scaleout.py dp`)", ""]
    if not dp:
        return out + missing("scaleout.py dp")
    out += [
        "`radixrt serve --dp 2` (two 1-thread replicas behind sglang-router) with the router's `cache_aware` "
        "policy against `round_robin`, and one replica with both threads (`dp=1`), each a fresh server, on "
        "`bench/serve.py`'s multi-turn chat, agent sessions (a system prompt per session) and few-shot workloads: "
        f"{dp['concurrency']} clients, "
        f"{dp['max_tokens']} output tokens per request, streamed; load average {dp['load_average'][0]:.1f}. "
        "Hit rate: the share of prompt tokens the replicas found in their caches."
        + (
            " This run used `--quick` (small workloads): a check that it works, not a comparison to rely on."
            if dp.get("quick")
            else ""
        ),
        "",
    ]
    rows = [{**x, "hit rate": f"{x['hit rate']:.1%}"} for x in dp["rows"]]
    out += [table(rows, list(rows[0])), ""]
    workloads = list(dict.fromkeys(x["workload"] for x in dp["rows"]))
    setups = list(dict.fromkeys(x["setup"] for x in dp["rows"]))
    hit = {(x["workload"], x["setup"]): 100 * x["hit rate"] for x in dp["rows"]}

    def draw(ax):
        grouped(ax, workloads, setups, lambda w, s: hit.get((w, s), 0))
        ax.set_ylabel("hit rate %")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8, loc="upper center", ncol=len(setups))
        ax.set_title("Prefix-cache hit rate per router policy", fontsize=10)

    return out + [figure("scaleout_dp", draw), ""]


def soak() -> list[str]:
    out = ["## Soak and chaos (`bench/soak.py`)", ""]
    r = load("soak")
    if not r:
        return out + missing("soak.py")
    a, s, o = r["args"], r["idle_stats"], r["outcomes"]
    out += [machine_line(r, "dtype auto", r["model"]), ""]
    out += [
        f"{a['requests']:,} requests of every kind (chat and completions, streamed or not, n > 1, JSON-schema "
        "output, `/generate` with stop strings, cache salts, DSL programs that fork) from "
        f"{a['concurrency']} clients against `radixrt serve` on a {a['max_total_tokens']:,}-token KV pool; about "
        "one in eight abandoned by its client mid-request, and the worker SIGKILLed twice. Not a speed "
        "comparison: the expected column is what must hold. See [server.md](server.md#benchmark).",
        "",
    ]
    probe, health, rss = r["probe_seconds"], r["health_seconds"], r["front_end_rss_mib"]
    rows = [
        ("requests", f"{a['requests']:,} in {r['seconds']:,.0f} s", ""),
        *((f"{k}", f"{v:,}", "") for k, v in sorted(o.items()) if k != "lost"),
        ("lost", o.get("lost", 0), 0),
        ("5xx outside the worker kills", r["server_errors_outside_kills"], 0),
        ("worker kills: down for (s)", ", ".join(f"{k['down_seconds']:.1f}" for k in r["kills"]), "2 kills"),
        ("idle: running + waiting", s["num_running"] + s["num_waiting"], 0),
        ("idle: used pages (leaked)", s["used_pages"], 0),
        ("idle: protected pages (locked)", s["protected_pages"], 0),
        ("idle: free + cached == total", s["free_pages"] + s["cached_pages"] == s["total_pages"], True),
        ("flush: every page free", r["flushed_all_free"], True),
        ("preemptions / evicted tokens", f"{s['num_preemptions']:,} / {s['evicted_tokens']:,}", "> 0"),
        ("probe request p50 / p99 / max (s)", f"{probe['p50']:.3f} / {probe['p99']:.3f} / {probe['max']:.3f}", ""),
        ("/health p99 / max (s)", f"{health['p99']:.3f} / {health['max']:.3f}", ""),
        ("front-end RSS before / after (MiB)", f"{rss['before']:,.0f} / {rss['after']:,.0f}", ""),
    ]
    rows = [dict(zip(("what", "value", "expected"), row)) for row in rows]
    return out + [table(rows, ["what", "value", "expected"]), ""]


def quant_kernels() -> list[str]:
    out = ["## Quantized linear kernels (`bench/quant_kernels.py`)", ""]
    r = load("quant_kernels")
    if not r:
        return out + missing("quant_kernels.py")
    out += [machine_line(r, "bf16 activations"), ""]
    per_layer = r["per_layer"]
    contenders = [c for c in per_layer[0] if c not in ("layer", "M") and not c.startswith("GB/s")]
    out += [
        "µs per call of the default model's linear layers (qkv 960x576, o 576x576, gate_up 3072x576, down "
        "576x1536, LM head 49152x576) at M rows, against bf16 `F.linear` (the unquantized path) in the same run: "
        "torch's int8 and int4 kernels (`aten-*`), radixrt's `csrc/quant_linear.cpp` in int8 (per channel) and "
        "int4 (groups of 32), int4 dequantized to bf16 followed by a bf16 GEMM, and what `QuantLinear` picks for "
        "that M. Hot: each layer called back to back (its weights in cache), the contenders interleaved, best "
        "round. Design and discussion: [kernels.md](kernels.md).",
        "",
        "All GEMMs of one decode step (hot per-layer times x 30 layers + the LM head), ms:",
        "",
        table(r["step_hot"], ["M", *contenders, "fastest"]),
        "",
    ]
    hot = r["step_hot"]
    shown = [
        c for c in ("bf16", "aten-int4", "native-int8", "native-int4", "dequant-int4", "QuantLinear") if c in hot[0]
    ]

    def draw(ax):
        for c in shown:
            ax.plot([x["M"] for x in hot], [x[c] for x in hot], marker="o", label=c)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rows M")
        ax.set_ylabel("ms per decode step's GEMMs")
        ax.legend(fontsize=8)
        ax.set_title("Linear layers of one step, hot (lower is better)", fontsize=10)

    out += [figure("quant_kernels", draw), ""]
    m1 = [x for x in per_layer if x["M"] == 1]
    out += ["Per layer at M = 1, µs per call (hot):", "", table(m1, ["layer", *contenders]), ""]
    out += [
        "One decode step's GEMMs cold (30 layers + LM head with distinct weights, in model order, so the "
        "weights stream from memory as in a real step):",
        "",
        table(r["step_cold"], ["M", "kernel", "ms", "GB/s"]),
        "",
    ]
    return out


def quant_quality() -> list[str]:
    out = ["## Quantization quality (`bench/quant_quality.py`)", ""]
    r = load("quant_quality")
    if not r:
        return out + missing("quant_quality.py")
    out += [machine_line(r, "bf16 but the float32 row"), ""]
    out += [
        f"Perplexity over the first {r['tokens']:,} tokens of Python's `help()` topics (`pydoc_data/topics.py`) "
        f"in windows of {r['window']}, each scored from its own start; greedy agreement over {r['prompts']} chat "
        "prompts x 32 tokens, against bf16 and against float32, in the same run. `bf16` is the GGUF's weights "
        "dequantized and rounded to bf16; `int8` (per channel) and `int4` (groups of 32, LM head int8) are "
        "requantized from it; `int4-head4` has an int4 LM head too; `gguf` is the GGUF's own Q4_1 / Q8_0 "
        "integers. The default model is itself a Q4_1 GGUF, so int4 in groups of 32 finds its grid again: "
        "this understates what int4 costs a model trained in float.",
        "",
    ]
    rows = [{**x, "perplexity": f"{x['perplexity']:.3f}"} for x in r["rows"]]
    return out + [table(rows, [c for c in rows[0] if c != "seconds"]), ""]


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
    lt = load("latency")
    if lt and lt.get("llama_cpp") and "default" in lt["results"]:
        d, peer = lt["results"]["default"], lt["llama_cpp"]
        rows.append(
            {
                "what": "decode, one request, GGUF 4-bit weights",
                "radixrt": f"{d['decode_b1']:.0f} tok/s",
                "baseline (same run)": f"llama.cpp tg128 {peer['tg128']:.0f} tok/s "
                f"({d['decode_b1'] / peer['tg128']:.2f}x)",
            }
        )
        rows.append(
            {
                "what": "prefill, 512-token prompt, GGUF 4-bit weights",
                "radixrt": f"{d['prefill_512']:,.0f} tok/s",
                "baseline (same run)": f"llama.cpp pp512 {peer['pp512']:.0f} tok/s "
                f"({d['prefill_512'] / peer['pp512']:.2f}x)",
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
    kv = load("kv_tiers")
    if kv and not kv["config"].get("quick"):
        v, c = {x["variant"]: x for x in kv["rows"]}, kv["config"]
        mem, disk, ceiling = v.get("memory only"), v.get("disk tier"), v.get("unbounded")
        if mem and disk:
            rows.append(
                {
                    "what": f"returning session, {c['history']:,}-token history, "
                    f"KV {c['kv_tokens'] / c['pool_tokens']:.1f}x the pool",
                    "radixrt": f"disk tier: TTFT {disk['return_ttft_p50_ms']:,.0f} ms, hit rate {disk['hit_rate']:.0%}",
                    "baseline (same run)": f"memory only: TTFT {mem['return_ttft_p50_ms']:,.0f} ms, "
                    f"hit rate {mem['hit_rate']:.0%}"
                    + (f"; unbounded pool {ceiling['return_ttft_p50_ms']:,.0f} ms" if ceiling else ""),
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
    so = load("scaleout")
    dp = so.get("dp") if so else None
    if dp and not dp.get("quick"):
        by = {(x["workload"], x["setup"]): x for x in dp["rows"]}
        for workload, name in (("multi-turn-chat", "multi-turn chat"), ("agent-sessions", "agent sessions")):
            aware, rr = by.get((workload, "dp=2 cache_aware")), by.get((workload, "dp=2 round_robin"))
            if aware and rr:
                rows.append(
                    {
                        "what": f"{name}, 2 replicas behind sglang-router, {dp['concurrency']} clients",
                        "radixrt": f"cache_aware: hit rate {aware['hit rate']:.0%}, {aware['output tok/s']:.0f} tok/s",
                        "baseline (same run)": f"round_robin: hit rate {rr['hit rate']:.0%}, "
                        f"{rr['output tok/s']:.0f} tok/s",
                    }
                )
    sp = load("speculative")
    if sp:
        at = {(x["workload"], x["config"]): x for x in sp["rows"] if x["batch"] == 1}
        found = [(w, at[w, "ngram"]) for w in ("quotes", "agent", "json", "free") if (w, "ngram") in at]
        if found:
            rows.append(
                {
                    "what": "speculative n-gram drafts, batch 1",
                    "radixrt": ", ".join(f"{w} {x['speedup']:.2f}x" for w, x in found),
                    "baseline (same run)": "no speculation, same prompts (free writing: the control)",
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
    qk = load("quant_kernels")
    if qk:
        cold = {x["kernel"]: x for x in qk["step_cold"] if x["M"] == 1}
        int4, bf16 = cold.get("native-int4"), cold.get("bf16")
        if int4 and bf16:
            rows.append(
                {
                    "what": "int4 linear layers of a decode step (batch 1)",
                    "radixrt": f"{int4['ms']:.1f} ms ({int4['GB/s']:.0f} GB/s)",
                    "baseline (same run)": f"bf16 weights {bf16['ms']:.1f} ms ({bf16['ms'] / int4['ms']:.1f}x)",
                }
            )
    sk = load("soak")
    if sk:
        idle = sk["idle_stats"]
        rows.append(
            {
                "what": f"soak: {sk['args']['requests']:,} mixed requests, {len(sk['kills'])} worker kills",
                "radixrt": f"{sk['outcomes'].get('lost', 0)} lost, {sk['server_errors_outside_kills']} 5xx outside "
                f"the kills, {idle['used_pages'] + idle['protected_pages']} pages leaked or locked",
                "baseline (same run)": "must all be 0",
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


LLAMA_CPP_DIR = "/tmp/llama/llama_cpp_python-0.3.36/vendor/llama.cpp"
LLAMA_CPP = [
    "llama.cpp is the peer where one is measured: `llama-bench` in `bench/latency.py`, `llama-server` in",
    "`bench/serve.py`. Both build from the llama.cpp sources vendored in the llama-cpp-python sdist (about",
    "10 minutes on 2 cores):",
    "",
    "```bash",
    "pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/llama && "
    "tar xzf /tmp/llama/llama_cpp_python-0.3.36.tar.gz -C /tmp/llama",
    f"cd {LLAMA_CPP_DIR} && cmake -B build -G Ninja -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON "
    "-DCMAKE_BUILD_TYPE=Release && cmake --build build --target llama-bench llama-server -j 2",
    "```",
    "",
    "then",
    f"`python bench/latency.py --llama-bench {LLAMA_CPP_DIR}/build/bin/llama-bench`",
    "(with `build/bin` on PATH, `bench/latency.py` finds `llama-bench` by itself); for `llama-server`, see the",
    "serving section.",
    "",
]

SECTIONS = [
    headline,
    throughput,
    latency,
    prefix_reuse,
    kv_tiers,
    serving,
    scaleout,
    speculative,
    programs,
    constrained,
    kernels,
    quant_kernels,
    quant_quality,
    policy_cost,
    page_size,
    soak,
]


def render() -> Path:
    lines = [
        "# Benchmarks",
        "",
        "Rendered by `python bench/run_all.py` (or `radixrt bench`) from `bench/results/*.json`. Every number",
        "is compared with a baseline measured in the same run on the same machine; figures state the machine,",
        "model and dtype. Our machines are shared 2-core CPUs: absolute numbers move with load, ratios less so.",
        "",
        "A change worth a few percent is smaller than this machine's drift (10-25% within the hour, and 10-15%",
        "within a process over seconds). To measure one, `python bench/ab.py --base COMMIT` runs the working tree",
        "and the commit (its own checkout and kernel build) in alternating processes, ABBA, and reports the median",
        "of the per-round time ratios with a bootstrap 95% interval (10 rounds resolve about 10%: processes of the",
        "same code differ by up to 15%); a change that can be switched inside one process is measured far more",
        "precisely there, as `bench/speculative.py --paired` does for speculation on and off.",
        "",
        *LLAMA_CPP,
    ]
    for section in SECTIONS:
        lines += section()
    path = DOCS / "benchmarks.md"
    path.write_text("\n".join(lines) + "\n")
    update_readme(headline_rows())
    return path


if __name__ == "__main__":
    print("wrote", render())
