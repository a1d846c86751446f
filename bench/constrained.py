"""Constrained decoding in the engine: a JSON-extraction workload, compile and mask cost per backend, jump-forward.

Workload: 64 short synthetic bios behind one shared instruction prefix (system prompt + one
worked example, cached after the first request); each answer is constrained to PERSON_SCHEMA
(name, age 0-120, city, occupation, email). Greedy.

Measured:
1. Throughput with and without the constraint, at batch 16 (all requests in one `generate`
   call on an engine with max_running_requests=16) and batch 1 (one request at a time; only
   the first --batch1-requests, it is slow). For a like-for-like comparison the unconstrained
   run generates exactly as many tokens per request as the constrained run did (max_new_tokens
   = that length, ignore_eos), so the difference is the grammar's cost (compile wait, mask
   fill, bitmask apply, accept), not a different output length. (No log-probs are requested:
   they would add a log-softmax over the batch to every step.) The prefix cache is flushed
   before every timed run; each configuration is timed --repeats times, interleaved, and the
   best run is kept (the machine is shared).
2. Compile time p50/p99 per backend over the schema corpus (tests/data/schemas: 216
   JSONSchemaBench schemas) plus the workload schema, each backend in a worker process with a
   per-schema time limit (a timeout counts at the limit). The whole 2,151-schema corpus is
   measured by bench/grammar_coverage.py.
3. Mask time per token per backend: the constrained run's real model outputs replayed through
   a fresh matcher of each backend, timing fill_bitmask (one row) and accept_token per token;
   plus apply_bitmask for 16 rows of the logits width.
4. Jump-forward: the constrained workload on Engine(enable_jump_forward=True) at both batch
   sizes: wall time, tokens/s, validity, share of tokens forced (found by replaying the outputs
   on a matcher, see forced_tokens).

    nice python bench/constrained.py              # ~15 min on the 2-core CPU
    nice python bench/constrained.py --quick      # fewer requests and repeats, one backend's compile

Table to stdout, JSON to bench/results/constrained.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import save, table  # noqa: E402

SCHEMA_CORPUS = ROOT / "tests" / "data" / "schemas" / "jsonschemabench"
BACKENDS = ("llguidance", "xgrammar", "outlines")

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string"},
        "occupation": {"type": "string"},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["name", "age", "city", "occupation", "email"],
    "additionalProperties": False,
}
SYSTEM = "Extract the person's name, age, city, occupation and email address from the bio. Reply with JSON only."
EXAMPLE_BIO = "Maria Lopez is a 34-year-old architect who lives in Madrid. Write to her at maria.lopez@example.com."
EXAMPLE_JSON = json.dumps(
    {"name": "Maria Lopez", "age": 34, "city": "Madrid", "occupation": "architect", "email": "maria.lopez@example.com"}
)

FIRST = [
    "John",
    "Aiko",
    "Priya",
    "Lars",
    "Fatima",
    "Diego",
    "Chen",
    "Olga",
    "Kwame",
    "Sofia",
    "Ahmed",
    "Emma",
    "Ravi",
    "Lucia",
    "Tomasz",
    "Mei",
]
LAST = [
    "Smith",
    "Tanaka",
    "Patel",
    "Berg",
    "Haddad",
    "Garcia",
    "Wei",
    "Ivanova",
    "Mensah",
    "Rossi",
    "Khan",
    "Dubois",
    "Kumar",
    "Silva",
    "Nowak",
    "Lin",
]
CITIES = [
    "Boston",
    "Osaka",
    "Mumbai",
    "Oslo",
    "Beirut",
    "Lima",
    "Shanghai",
    "Kyiv",
    "Accra",
    "Rome",
    "Karachi",
    "Lyon",
    "Delhi",
    "Porto",
    "Krakow",
    "Taipei",
]
JOBS = [
    "teacher",
    "nurse",
    "engineer",
    "baker",
    "pilot",
    "lawyer",
    "chef",
    "dentist",
    "farmer",
    "journalist",
    "plumber",
    "architect",
    "librarian",
    "photographer",
    "carpenter",
    "pharmacist",
]
TEMPLATES = [
    "{first} {last} is a {age}-year-old {job} who lives in {city}. Contact: {email}.",
    "At {age}, {job} {first} {last} still works every day in {city}. Email {email} for appointments.",
    "{first} {last}, {age}, moved to {city} last spring to work as a {job}; reach them at {email}.",
    "Born {age} years ago, {first} {last} is now a {job} in {city} ({email}).",
]


def bios(n: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        first, last = FIRST[i % 16], LAST[(i * 7) % 16]
        truth = {
            "name": f"{first} {last}",
            "age": rng.randint(19, 79),
            "city": CITIES[(i * 5) % 16],
            "occupation": JOBS[(i * 3) % 16],
            "email": f"{first.lower()}.{last.lower()}@example.com",
        }
        text = TEMPLATES[i % len(TEMPLATES)].format(
            first=first, last=last, age=truth["age"], job=truth["occupation"], city=truth["city"], email=truth["email"]
        )
        out.append({"bio": text, "truth": truth})
    return out


def prompt(engine, bio: str) -> str:
    return engine.render_chat(
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": EXAMPLE_BIO},
            {"role": "assistant", "content": EXAMPLE_JSON},
            {"role": "user", "content": bio},
        ]
    )


def pct(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


# ---- 1 + 4: throughput in the engine -------------------------------------------------------------------------
def run_workload(engine, prompts, params, batch: int):
    """Wall time and outputs; batch 1 = one generate call per request, else one call for all."""
    engine.flush_cache()
    t0 = time.perf_counter()
    if batch == 1:
        outs = [engine.generate(p, sp) for p, sp in zip(prompts, params)]
    else:
        outs = engine.generate(prompts, params)
    return time.perf_counter() - t0, outs


def summarize(name, batch, wall, outs, records, validator, forced=None):
    tokens = sum(len(o.token_ids) for o in outs)
    row = {
        "config": name,
        "batch": batch,
        "requests": len(outs),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_s": round(tokens / wall, 2),
        "req_s": round(len(outs) / wall, 3),
    }
    if validator is not None:
        valid = sum(o.finish_reason == "stop" and validator(o.text) is None for o in outs)
        correct = total = 0
        for o, rec in zip(outs, records):
            try:
                got = json.loads(o.text)
            except ValueError:
                got = {}
            for k, v in rec["truth"].items():
                total += 1
                correct += got.get(k) == v
        row.update(valid=f"{valid}/{len(outs)}", fields_correct=f"{correct / total:.0%}")
    if forced is not None:
        row["forced_share"] = f"{forced / max(tokens, 1):.0%}"
    return row


def forced_tokens(engine, spec: str, outs) -> int:
    """How many output tokens jump-forward appended: replay each output on a fresh matcher and,
    after every sampled token, ask the worker's RequestGrammars.jump_forward what it would append."""
    from types import SimpleNamespace

    grammars = engine.worker.grammars
    compiled = grammars.compiler.submit("json_schema", spec).result()
    forced = 0
    for out in outs:
        tokens, i = out.token_ids, 0
        req = SimpleNamespace(grammar=grammars.compiler.backend.matcher(compiled))
        while i < len(tokens) and req.grammar.accept_token(tokens[i]):
            i += 1
            ids = grammars.jump_forward(req, len(tokens) - i + 1)  # accepts them into the matcher
            if ids and tokens[i : i + len(ids)] != ids:
                raise AssertionError(f"output does not contain the forced tokens at {i}: {ids}")
            forced += len(ids)
            i += len(ids)
    return forced


def throughput(args, records):
    from radixrt import Engine
    from radixrt.constrained.walk import json_validator

    validator = json_validator(PERSON_SCHEMA)
    spec = json.dumps(PERSON_SCHEMA)
    rows, outputs = [], {}
    for jump_forward in (False, True):
        with Engine(max_running_requests=16, enable_jump_forward=jump_forward) as engine:
            prompts = [prompt(engine, r["bio"]) for r in records]
            engine.generate(prompts[:2], {"max_new_tokens": 4, "json_schema": spec})  # warm up; compile cached
            for batch in (16, 1):
                n = len(records) if batch > 1 else args.batch1_requests
                cparams = [{"max_new_tokens": args.max_new_tokens, "temperature": 0.0, "json_schema": spec}] * n
                best: dict[str, tuple] = {}
                for _ in range(args.repeats):
                    wall, outs = run_workload(engine, prompts[:n], cparams, batch)
                    if "json" not in best or wall < best["json"][0]:
                        best["json"] = (wall, outs)
                    if jump_forward:
                        continue
                    # Unconstrained, exactly as many tokens per request as the constrained run.
                    fparams = [
                        {"max_new_tokens": len(o.token_ids), "temperature": 0.0, "ignore_eos": True} for o in outs
                    ]
                    wall_f, outs_f = run_workload(engine, prompts[:n], fparams, batch)
                    if "free" not in best or wall_f < best["free"][0]:
                        best["free"] = (wall_f, outs_f)
                wall, outs = best["json"]
                forced = forced_tokens(engine, spec, outs) if jump_forward else None
                name = "json_schema + jump-forward" if jump_forward else "json_schema"
                rows.append(summarize(name, batch, wall, outs, records[:n], validator, forced))
                outputs[(jump_forward, batch)] = outs
                if jump_forward and (False, batch) in outputs:
                    same = sum(a.text == b.text for a, b in zip(outs, outputs[(False, batch)]))
                    rows[-1]["same_text_as_off"] = f"{same}/{len(outs)}"
                if not jump_forward:
                    rows.append(summarize("unconstrained (same lengths)", batch, *best["free"], records[:n], None))
                print(table(rows[-2 if not jump_forward else -1 :], list(rows[-1].keys())), flush=True)
    return rows, outputs


# ---- 2: compile time per backend ------------------------------------------------------------------------------
def _compile_worker(conn, backend_name: str) -> None:
    from radixrt.constrained import GrammarError, get_backend
    from radixrt.model.loader import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(None))
    backend = get_backend(backend_name, tok, len(tok))
    conn.send("ready")
    while (spec := conn.recv()) is not None:
        t0 = time.perf_counter()
        try:
            compiled = backend.compile("json_schema", spec)
            conn.send(("ok", compiled.compile_s or time.perf_counter() - t0))
        except GrammarError as exc:
            conn.send(("refused", time.perf_counter() - t0, str(exc)[:120]))


def compile_times(backend_name: str, specs: list[str], timeout: float) -> dict:
    ctx = mp.get_context("spawn")

    def start():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_compile_worker, args=(child, backend_name), daemon=True)
        proc.start()
        if not parent.poll(300) or parent.recv() != "ready":
            raise RuntimeError(f"{backend_name} worker did not start")
        return parent, proc

    conn, proc = start()
    ok, refused, timeouts = [], 0, 0
    for spec in specs:
        conn.send(spec)
        if conn.poll(timeout):
            status, seconds, *_ = conn.recv()
            if status == "ok":
                ok.append(seconds)
            else:
                refused += 1
        else:
            timeouts += 1
            ok.append(timeout)  # counted at the limit: the percentiles are then lower bounds
            proc.kill()
            proc.join()
            conn, proc = start()
    conn.send(None)
    proc.join(5)
    ms = [s * 1e3 for s in ok]
    return {
        "backend": backend_name,
        "schemas": len(specs),
        "compiled": len(ok) - timeouts,
        "refused": refused,
        "timeouts": timeouts,
        "compile_ms_p50": round(pct(ms, 50), 2),
        "compile_ms_p99": round(pct(ms, 99), 2),
        "compile_ms_max": round(max(ms), 1) if ms else None,
    }


# ---- 3: mask time per token per backend -------------------------------------------------------------------------
def mask_times(backend_name: str, spec: str, token_lists: list[list[int]]) -> dict:

    from radixrt.constrained import GrammarError, allocate_bitmask, get_backend
    from radixrt.model.loader import load_tokenizer, read_model_config, resolve_model_path

    folder = resolve_model_path(None)
    tok = load_tokenizer(folder)
    config = read_model_config(folder)
    vocab = config.vocab_size
    backend = get_backend(backend_name, tok, vocab, stop_token_ids=sorted(config.eos_token_ids))
    schema_used = "workload"
    try:
        compiled = backend.compile("json_schema", spec)
    except GrammarError:  # outlines refuses numeric bounds and the email format: time it without them
        relaxed = json.loads(spec)
        for prop in relaxed["properties"].values():
            for key in ("minimum", "maximum", "format"):
                prop.pop(key, None)
        compiled = backend.compile("json_schema", json.dumps(relaxed))
        schema_used = "without minimum/maximum/format"
    mask = allocate_bitmask(1, vocab)
    fill, accept, rejected = [], [], 0
    for tokens in token_lists:
        matcher = backend.matcher(compiled)
        for token in tokens:
            t0 = time.perf_counter()
            matcher.fill_bitmask(mask, 0)
            t1 = time.perf_counter()
            ok = matcher.accept_token(token)
            t2 = time.perf_counter()
            fill.append(t1 - t0)
            accept.append(t2 - t1)
            if not ok:  # another backend's whitespace/number conventions: stop replaying this output
                rejected += 1
                break
    us = lambda xs, q: round(pct(xs, q) * 1e6, 1)  # noqa: E731
    per_token = [f + a for f, a in zip(fill, accept)]
    return {
        "backend": backend_name,
        "schema": schema_used,
        "tokens": len(fill),
        "outputs_rejected": rejected,
        "fill_us_p50": us(fill, 50),
        "fill_us_p99": us(fill, 99),
        "accept_us_p50": us(accept, 50),
        "mask_accept_us_mean": round(statistics.fmean(per_token) * 1e6, 1) if per_token else None,
    }


def apply_times(vocab: int) -> list[dict]:
    """apply_bitmask on [B, V] float32 logits, every row constrained, with 1 and 2 torch threads.

    On a 2-core machine whose other core is busy, each parallel region of a 2-thread op can wait
    a scheduler tick for its second thread; the `rows` path (index_select + index_copy_ per row)
    opens one region per row, the all-rows path (rows=None) a few."""
    import torch

    from radixrt.constrained import allocate_bitmask, apply_bitmask

    threads = torch.get_num_threads()
    out = []
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            for batch in (16, 64):
                logits, bitmask = torch.randn(batch, vocab), allocate_bitmask(batch, vocab)
                row = {"torch_threads": n, "rows": batch}
                for label, rows in (("rows_path_ms_p50", list(range(batch))), ("all_rows_ms_p50", None)):
                    times = []
                    for _ in range(20):
                        t0 = time.perf_counter()
                        apply_bitmask(logits, bitmask, rows)
                        times.append(time.perf_counter() - t0)
                    row[label] = round(pct(times, 50) * 1e3, 2)
                out.append(row)
    finally:
        torch.set_num_threads(threads)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--batch1-requests", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile-timeout", type=float, default=20.0)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--quick", action="store_true", help="16 requests, 4 at batch 1, one repeat, llguidance only")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.batch1_requests, args.repeats, args.backends = 16, 4, 1, "llguidance"
    backends = [b for b in args.backends.split(",") if b]
    records = bios(args.requests)
    t_start = time.time()

    rows, outputs = throughput(args, records)
    json16 = next(r for r in rows if r["config"] == "json_schema" and r["batch"] == 16)
    free16 = next(r for r in rows if r["config"].startswith("unconstrained") and r["batch"] == 16)
    overhead16 = 1 - json16["tok_s"] / free16["tok_s"]

    specs = [json.dumps(PERSON_SCHEMA)] + [p.read_text() for p in sorted(SCHEMA_CORPUS.glob("*/*.json"))]
    compile_rows = [compile_times(b, specs, args.compile_timeout) for b in backends]
    print(table(compile_rows, list(compile_rows[0].keys())), flush=True)

    token_lists = [o.token_ids for o in outputs[(False, 16)]]
    mask_rows = [mask_times(b, json.dumps(PERSON_SCHEMA), token_lists) for b in backends]
    print(table(mask_rows, list(mask_rows[0].keys())), flush=True)
    from radixrt.model.loader import read_model_config, resolve_model_path

    apply_rows = apply_times(read_model_config(resolve_model_path(None)).vocab_size)
    print(table(apply_rows, list(apply_rows[0].keys())), flush=True)

    print()
    print(
        table(
            rows,
            [
                "config",
                "batch",
                "requests",
                "tokens",
                "wall_s",
                "tok_s",
                "req_s",
                "valid",
                "fields_correct",
                "forced_share",
                "same_text_as_off",
            ],
        )
    )
    print(f"\nconstraint overhead at batch 16: {overhead16:.1%} of unconstrained tokens/s (target <= 10%)")
    default = next((r for r in compile_rows if r["backend"] == "llguidance"), None)
    if default:
        print(f"llguidance compile p99: {default['compile_ms_p99']} ms (target < 100 ms)")
    payload = {
        "options": vars(args),
        "throughput": rows,
        "overhead_batch16": overhead16,
        "compile": compile_rows,
        "mask": mask_rows,
        "apply_bitmask": apply_rows,
        "schema": PERSON_SCHEMA,
        "wall_s": round(time.time() - t_start, 1),
        "examples": {
            "json_schema": [o.text for o in outputs[(False, 16)][:3]],
            "jump_forward": [o.text for o in outputs[(True, 16)][:3]],
        },
    }
    path = save("constrained", payload)
    print(f"results -> {path}")
    return payload


if __name__ == "__main__":
    main()
