"""Run every benchmark, then render docs/benchmarks.md with tables and plots.

    python bench/run_all.py                 # everything (a few hours on 2 CPU cores)
    python bench/run_all.py --quick         # smoke-sized runs
    python bench/run_all.py --render-only   # re-render from bench/results/*.json
    radixrt bench                           # the same as the first line

Run with nothing else busy on the machine: two compute threads on two cores slow down
badly when anything else runs, and every comparison is against a baseline of the same run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# (script, arguments for a full run, arguments for a quick run)
SUITE = [
    ("throughput.py", [], ["--quick"]),
    ("throughput.py", ["--dtype", "bfloat16"], ["--quick", "--dtype", "bfloat16"]),
    ("latency.py", [], ["--quick", "--configs", "default,bf16"]),  # + llama-bench when it is on PATH
    ("prefix_reuse.py", [], ["--quick"]),
    ("kv_tiers.py", [], ["--quick"]),
    ("policy_cost.py", [], ["--quick"]),
    ("page_size.py", [], ["--page-sizes", "4,16", "--rounds", "1"]),
    ("kernels.py", [], ["--quick"]),
    ("quant_kernels.py", [], ["--quick"]),
    ("quant_quality.py", [], []),  # no smaller run (~3-5 min)
    ("serve.py", [], ["--quick"]),
    ("scaleout.py", ["tp"], ["tp", "--batches", "1", "--steps", "5", "--rounds", "1"]),
    ("scaleout.py", ["dp"], ["dp", "--quick"]),
    ("speculative.py", [], ["--quick"]),
    ("constrained.py", [], ["--quick"]),
    ("grammar_coverage.py", [], ["--sample", "50"]),  # all 2,151 schemas
    ("programs.py", [], ["--quick"]),
    ("soak.py", [], ["--requests", "300"]),  # 10,000 requests, ~10-20 min
]


def run_suite(quick: bool, only: set[str] | None) -> list[tuple[str, int, float]]:
    outcomes = []
    plan = [s for s in SUITE if not only or s[0].removesuffix(".py") in only]
    for script, full, fast in tqdm(plan, desc="benchmarks", unit="bench"):
        if not (BENCH / script).exists():
            continue
        start = time.perf_counter()
        tqdm.write(f"== {script}")
        rc = subprocess.call([sys.executable, str(BENCH / script), *(fast if quick else full)], cwd=BENCH)
        outcomes.append((script, rc, time.perf_counter() - start))
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-sized runs")
    parser.add_argument("--only", default="", help="comma-separated bench names, e.g. throughput,serve")
    parser.add_argument("--render-only", action="store_true", help="only re-render docs/benchmarks.md")
    args = parser.parse_args()
    failed = []
    if not args.render_only:
        outcomes = run_suite(args.quick, set(filter(None, args.only.split(","))) or None)
        failed = [s for s, rc, _ in outcomes if rc != 0]
        for script, rc, secs in outcomes:
            print(f"{script:24s} {'ok' if rc == 0 else f'FAILED ({rc})':12s} {secs:7.1f} s")
    from report import render

    print("wrote", render())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
