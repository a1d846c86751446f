"""A/B: is the working tree faster or slower than another commit, by how much, with what confidence.

    python bench/ab.py --base HEAD~1                               # batch-1 decode, 10 rounds
    python bench/ab.py --base main --cases decode-b1,decode-b32 --rounds 16

This machine's speed wanders 10-25% within the hour (its neighbours come and go), so a change of a few
percent cannot be seen by timing the old code, then the new. Here the base commit gets a checkout of its
own (a git worktree, removed afterwards) and a native-kernel build of its own (cached under
~/.cache/radixrt-ab), and the two versions alternate round by round in ABBA order, each round a fresh
process that times one case (the best of REPEATS inside it, after a warm-up: the first steps of a
process run several times slower, and the machine's speed drifts within seconds too). The report is
the median of the per-round ratios (working tree / base, time: below 1 is faster) with a bootstrap 95%
interval of that median. Run it with nothing else busy: two processes on two cores stall each other.

How precise: processes of the same code differ by up to 15% here (the batch-1 step: 3.0-4.1 ms over one
10-round run), so 10 rounds resolve about 10%; a 3% change needs far more rounds. When the change can be
switched inside one process, alternate it there instead (as `bench/speculative.py --paired` does): that
resolved a 3% batch-1 gain in 6 rounds that 10 rounds here could not (docs/kernels.md).

Cases, with the defaults (bf16 compute, the GGUF's own 4-bit weights), a Worker stepped directly:
  decode-b1, decode-b8, decode-b32   ms per decode step of 1, 8 or 32 requests (64-token prompts; the
                                     difference between runs of 8 and 8 + 64 new tokens, so prefill cancels)
  prefill-512                        ms to prefill a 512-token prompt, cache flushed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import median_interval, save, table
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
CASES = ("decode-b1", "decode-b8", "decode-b32", "prefill-512")
DECODE_TOKENS = 64
REPEATS = 8


def measure(case: str) -> float:
    """ms of one case in this process (the radixrt on PYTHONPATH), best of REPEATS."""
    from radixrt import ipc
    from radixrt.config import EngineConfig
    from radixrt.sampling_params import SamplingParams
    from radixrt.worker.worker import Worker

    worker = Worker(EngineConfig(kv_memory_gb=1.0))
    counter = iter(range(10**9))

    def run(prompts: list[list[int]], new_tokens: int) -> float:
        worker.handle(ipc.FlushCacheReq())
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        for prompt in prompts:
            worker.handle(ipc.GenerateReq(f"r{next(counter)}", prompt, params))
        start = time.perf_counter()
        while worker.has_work():
            worker.step()
        return time.perf_counter() - start

    if case == "prefill-512":
        prompt = [1000 + i for i in range(512)]
        for _ in range(2):  # warm-up
            run([prompt], 1)
        return 1e3 * min(run([prompt], 1) for _ in range(REPEATS))
    batch = int(case.removeprefix("decode-b"))
    prompts = [[1000 + (b * 37 + i) % 20000 for i in range(64)] for b in range(batch)]
    for _ in range(2):  # warm-up
        run(prompts, 8 + DECODE_TOKENS)
    return 1e3 * min((run(prompts, 8 + DECODE_TOKENS) - run(prompts, 8)) / DECODE_TOKENS for _ in range(REPEATS))


def run_case(checkout: Path, cache_dir: Path | None, case: str) -> float:
    """One round: a fresh process timing `case` with the radixrt of `checkout`."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    if cache_dir is not None:
        env["RADIXRT_CACHE_DIR"] = str(cache_dir)
    out = subprocess.run([sys.executable, __file__, "--measure", case], env=env, check=True, capture_output=True,
                         text=True, cwd=Path(__file__).parent)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="the commit the working tree is compared with")
    parser.add_argument("--cases", default="decode-b1", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=10, help="ABBA rounds; each gives one ratio per case")
    parser.add_argument("--measure", choices=CASES, help=argparse.SUPPRESS)  # a round's child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps({"ms": measure(args.measure)}))
        return
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r} (choose from {', '.join(CASES)})")
    sha = subprocess.run(["git", "rev-parse", args.base], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    cache_dir = Path.home() / ".cache" / "radixrt-ab" / sha[:12]
    base_dir = Path(tempfile.mkdtemp(prefix="radixrt-ab-"))
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(base_dir), sha], cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    try:
        times: dict[str, dict[str, list[float]]] = {c: {"base": [], "tree": []} for c in cases}
        versions = {"base": (base_dir, cache_dir), "tree": (REPO, None)}
        for r in tqdm(range(args.rounds), desc=f"rounds against {args.base} ({sha[:12]})"):
            for case in cases:
                for name in ("base", "tree") if r % 2 == 0 else ("tree", "base"):
                    times[case][name].append(run_case(*versions[name], case))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_dir)], cwd=REPO, capture_output=True)
        shutil.rmtree(base_dir, ignore_errors=True)
    rows = []
    for case in cases:
        base, tree = np.array(times[case]["base"]), np.array(times[case]["tree"])
        ratio, low, high = median_interval(tree / base)
        rows.append({"case": case, "rounds": args.rounds, "base_ms": float(np.median(base)),
                     "tree_ms": float(np.median(tree)), "tree_over_base": ratio, "ci95_low": low, "ci95_high": high,
                     "tree_faster_rounds": f"{int((tree < base).sum())}/{args.rounds}"})  # fmt: skip
    print(f"\nworking tree against {args.base} ({sha[:12]}); time ratio below 1: the working tree is faster\n")
    print(table(rows, list(rows[0])))
    print("results:", save("ab", {"base": args.base, "base_sha": sha, "rows": rows, "times": times}))


if __name__ == "__main__":
    main()
