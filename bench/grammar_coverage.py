"""Schema coverage, compile time and mask time of each grammar backend on real-world JSON schemas.

Corpus: JSONSchemaBench (Geng et al. 2025, arXiv 2501.10868; guidance-ai/jsonschemabench), the
Glaiveai2K and Github_trivial subsets in /work/shared/data/jsonschemabench (see its SOURCE.md).

For each schema and backend: compile; if that works, run a few random walks (uniform over the
allowed tokens, then finishing; see radixrt/constrained/walk.py) and validate each finished
output with `jsonschema`. A schema is *covered* when it compiles and every finished walk is
valid (and at least one finished). Each backend runs in its own worker process so that a
schema that hangs or crashes an engine costs only its time budget: the worker is killed and
restarted.

    nice python bench/grammar_coverage.py                     # whole corpus, all backends
    nice python bench/grammar_coverage.py --sample 300 --raw  # engines without our keyword audit
    nice python bench/grammar_coverage.py --lenient            # strict false: unenforceable keywords dropped
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = Path("/work/shared/data/jsonschemabench")
BACKENDS = ("xgrammar", "llguidance", "outlines")


def load_tokenizer():
    from radixrt.model.loader import load_tokenizer as load
    from radixrt.model.loader import resolve_model_path

    return load(resolve_model_path(None))


# ---- worker process ------------------------------------------------------------------------
def _worker(conn, backend_name: str, args: dict) -> None:
    from radixrt.constrained import GrammarError, get_backend
    from radixrt.constrained.lenient import enforced
    from radixrt.constrained.vocab import token_bytes
    from radixrt.constrained.walk import Walker, json_validator

    tok = load_tokenizer()
    vocab_size = args["vocab_size"] or len(tok)
    backend = get_backend(backend_name, tok, vocab_size, preprocess=not args["raw"])
    walker = Walker(token_bytes(tok, vocab_size), backend.stop_token_ids, vocab_size)
    conn.send("ready")
    while True:
        path = conn.recv()
        if path is None:
            return
        spec = Path(path).read_text()
        rec: dict = {"schema": str(Path(path).relative_to(CORPUS))}
        try:
            compiled = backend.compile("json_schema_lenient" if args["lenient"] else "json_schema", spec)
        except GrammarError as exc:
            rec.update(status="compile_error", error=str(exc)[:300])
            conn.send((rec, []))
            continue
        rec.update(status="ok", compile_s=compiled.compile_s, unenforced=list(compiled.unenforced))
        check = json_validator(enforced(json.loads(spec), compiled.unenforced))  # lenient: what was kept
        rng = random.Random(zlib.crc32(rec["schema"].encode()))
        deadline = time.perf_counter() + args["walk_budget"]
        mask_s: list[float] = []
        finished = invalid = errors = 0
        for i in range(args["walks"]):
            walk = walker.walk(backend.matcher(compiled), rng, max_tokens=args["max_tokens"],
                               free_steps=args["free_steps"][i % len(args["free_steps"])], deadline=deadline)
            mask_s += walk.mask_s
            if walk.error:
                errors += walk.error != "time budget exceeded"
                rec.setdefault("walk_error", walk.error[:300])
            if not walk.terminated:
                continue
            finished += 1
            reason = check(walk.text)
            if reason is not None:
                invalid += 1
                rec.setdefault("invalid_example", {"text": (walk.text or "")[:500], "reason": reason})
        rec.update(walks=args["walks"], finished=finished, invalid=invalid, errors=errors)
        conn.send((rec, mask_s))


class Worker:
    def __init__(self, backend: str, args: dict) -> None:
        self.backend, self.args = backend, args
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, self.backend, self.args), daemon=True)
        self.proc.start()
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError(f"{self.backend} worker did not start")

    def run(self, path: Path, timeout: float):
        self.conn.send(str(path))
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                status = "crash"
        else:
            status = "timeout"
        self.proc.kill()
        self.proc.join()
        self._start()
        return {"schema": str(path.relative_to(CORPUS)), "status": status}, []

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(5)


# ---- aggregation ---------------------------------------------------------------------------
def summarize(records: list[dict], mask_s: list[float]) -> dict:
    n = len(records)
    count = lambda pred: sum(1 for r in records if pred(r))  # noqa: E731
    compiled = [r for r in records if r["status"] == "ok"]
    covered = count(lambda r: r["status"] == "ok" and r["finished"] and not r["invalid"] and not r["errors"])
    compile_ms = np.array([r["compile_s"] * 1e3 for r in compiled]) if compiled else np.zeros(1)
    mask_us = np.array(mask_s) * 1e6 if mask_s else np.zeros(1)
    return {
        "schemas": n,
        "compiled": len(compiled),
        "covered": covered,
        "coverage": covered / n if n else 0.0,
        "invalid": count(lambda r: r.get("invalid", 0) > 0),
        "walk_errors": count(lambda r: r.get("errors", 0) > 0),
        "unfinished": count(lambda r: r["status"] == "ok" and r["finished"] == 0),
        "compile_errors": count(lambda r: r["status"] == "compile_error"),
        "with_unenforced": count(lambda r: bool(r.get("unenforced"))),
        "timeouts": count(lambda r: r["status"] == "timeout"),
        "crashes": count(lambda r: r["status"] == "crash"),
        "compile_ms_p50": float(np.percentile(compile_ms, 50)),
        "compile_ms_p99": float(np.percentile(compile_ms, 99)),
        "mask_us_p50": float(np.percentile(mask_us, 50)),
        "mask_us_p99": float(np.percentile(mask_us, 99)),
        "mask_steps": len(mask_s),
        "top_compile_errors": _top([r.get("error", "") for r in records if r["status"] == "compile_error"]),
        "top_invalid_reasons": _top([r["invalid_example"]["reason"] for r in records
                                     if r.get("invalid_example")]),
    }


def _top(messages: list[str], n: int = 8) -> list[tuple[str, int]]:
    """The most common messages, with quoted values and pointers blanked so alike ones group."""
    import re
    from collections import Counter

    keys = [re.sub(r"'[^']*'|\(at [^)]*\)| at \S*$", "…", m)[:120] for m in messages]
    return Counter(keys).most_common(n)


def print_table(summaries: dict[str, dict]) -> None:
    head = ("backend", "schemas", "compiled", "covered", "invalid", "unfinished", "timeouts",
            "compile p50/p99 ms", "mask p50/p99 us")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, s in summaries.items():
        print(f"| {name} | {s['schemas']} | {s['compiled']} | {s['covered']} ({100 * s['coverage']:.1f}%) | "
              f"{s['invalid']} | {s['unfinished']} | {s['timeouts'] + s['crashes']} | "
              f"{s['compile_ms_p50']:.1f} / {s['compile_ms_p99']:.0f} | "
              f"{s['mask_us_p50']:.0f} / {s['mask_us_p99']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--sample", type=int, default=0, help="a random subset of this many schemas (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--walks", type=int, default=4, help="random walks per schema")
    ap.add_argument("--free-steps", default="0,4,16,48", help="uniform steps before finishing, per walk")
    ap.add_argument("--max-tokens", type=int, default=768)
    ap.add_argument("--compile-timeout", type=float, default=20.0, help="seconds per schema to compile")
    ap.add_argument("--walk-budget", type=float, default=10.0, help="seconds per schema for all its walks")
    ap.add_argument("--vocab-size", type=int, default=0, help="logits width (0 = the tokenizer's)")
    ap.add_argument("--raw", action="store_true", help="skip our audit of keywords an engine ignores")
    ap.add_argument("--lenient", action="store_true",
                    help="compile as response_format strict false; outputs checked against what was enforced")
    ap.add_argument("--out", default=None, help="default: bench/results/grammar_coverage[_lenient].json")
    opts = ap.parse_args()
    opts.out = opts.out or str(ROOT / f"bench/results/grammar_coverage{'_lenient' if opts.lenient else ''}.json")

    files = sorted(CORPUS.glob("*/*.json"))
    if opts.sample:
        files = sorted(random.Random(opts.seed).sample(files, min(opts.sample, len(files))))
    args = {"walks": opts.walks, "free_steps": [int(x) for x in opts.free_steps.split(",")],
            "max_tokens": opts.max_tokens, "walk_budget": opts.walk_budget, "raw": opts.raw, "lenient": opts.lenient,
            "vocab_size": opts.vocab_size}
    summaries, results = {}, {}
    for name in opts.backends.split(","):
        worker = Worker(name, args)
        records, mask_s = [], []
        started = time.perf_counter()
        for i, path in enumerate(files):
            rec, steps = worker.run(path, opts.compile_timeout + opts.walk_budget + 5)
            records.append(rec)
            mask_s += steps
            if (i + 1) % 100 == 0:
                print(f"  {name}: {i + 1}/{len(files)} ({time.perf_counter() - started:.0f} s)", flush=True)
        worker.close()
        summaries[name] = summarize(records, mask_s)
        summaries[name]["wall_s"] = time.perf_counter() - started
        results[name] = records
        print(f"{name}: {json.dumps(summaries[name])}", flush=True)
    print_table(summaries)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"corpus": str(CORPUS), "files": len(files), "options": vars(opts),
                               "summary": summaries, "schemas": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
