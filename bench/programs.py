"""Agent programs through the DSL on radixrt vs the same programs as plain sequential calls.

    nice python bench/programs.py            # the four workloads, default model
    nice python bench/programs.py --quick    # fewer programs, for a smoke run

Both sides run the very same program functions (from examples/) in the same process:

  radixrt    an Engine with the radix cache; run_batch runs programs concurrently, fork
             branches run concurrently, each fork / batch caches its shared prefix first and
             select scores all choices in one request from the cached prefix.
  baseline   an Engine with the cache off (`disable_radix_cache=True`) behind a backend that
             does what a plain chat-completions client does: one call at a time, the whole
             prompt every call, one request per select choice, programs one after another.

Reported: programs/s and generated tokens/s (wall clock), and how many prompt tokens each
side had to compute. Results: bench/results/programs.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import few_shot_qa  # noqa: E402
import json_extraction  # noqa: E402
import react_agent  # noqa: E402
import tree_of_thought  # noqa: E402
from common import save, table  # noqa: E402

from radixrt import Engine  # noqa: E402
from radixrt.lang.backend import scoring  # noqa: E402
from radixrt.lang.backend.engine import EngineBackend  # noqa: E402

COUNTRIES = ("France Germany Italy Spain Japan China India Brazil Canada Mexico Egypt Kenya Peru Chile Norway "
             "Sweden Poland Greece Turkey Russia Australia Argentina Portugal Ireland Austria Belgium Denmark "
             "Finland Hungary Thailand Vietnam Indonesia").split()  # fmt: skip
TOT_QUESTIONS = [
    tree_of_thought.QUESTION,
    "A train travels 60 km in the first hour and 80 km in the second hour. How far does it travel in total?",
    "Tom is twice as old as Anna. Anna is 7. How old will Tom be in 3 years?",
    "A recipe needs 3 eggs per cake. How many eggs do I need for 4 cakes if I already have 5?",
]
REACT_QUESTIONS = ["What is 23 times 19?", "What is 1234 plus 5678?", "What is 17 squared?", "What is 999 minus 123?"]
PEOPLE = json_extraction.TEXTS + [
    "Carlos Silva, a 52-year-old chef, runs a small restaurant in Lisbon.",
    "The new mayor of Toronto, 45-year-old Priya Patel, took office in May.",
    "Born 29 years ago, software engineer Lukas Meyer now lives in Berlin.",
]


def workloads(quick: bool) -> list[tuple[str, object, list[dict]]]:
    questions = [f"What is the capital of {c}?" for c in COUNTRIES[: 8 if quick else 32]]
    thoughts = TOT_QUESTIONS[: 2 if quick else 4]
    tasks = REACT_QUESTIONS[: 2 if quick else 4]
    people = PEOPLE[: 3 if quick else 6]
    return [
        ("few-shot batch", few_shot_qa.few_shot_qa, [{"question": q, "max_tokens": 16} for q in questions]),
        ("tree-of-thought", tree_of_thought.tree_of_thought, [{"question": q, "max_tokens": 32} for q in thoughts]),
        ("react", react_agent.react_agent, [{"question": q, "max_tokens": 24, "max_steps": 3} for q in tasks]),
        ("json extraction", json_extraction.extract_person, [{"text": t, "max_tokens": 48} for t in people]),
    ]


class SequentialBackend(EngineBackend):
    """The baseline client: one request at a time, full prompts, no prefix caching requests."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.lock = threading.Lock()

    def generate(self, s, sampling_params):
        with self.lock:
            return super().generate(s, sampling_params)

    def select(self, s, choices, temperature, choices_method):
        with self.lock:
            items = scoring.split_choices(self._encode, s.text_, choices)
            conditional, unconditional = [], []
            for it in items:
                out = self.engine.generate(input_ids=it.ids, sampling_params=_score(it.start))
                conditional.append(scoring.token_logprobs(out.prompt_logprobs[it.start :], it.choice_ids))
                if choices_method.requires_unconditional_logprobs:
                    out = self.engine.generate(input_ids=it.choice_ids, sampling_params=_score(0))
                    unconditional.append(scoring.token_logprobs(out.prompt_logprobs, it.choice_ids))
            return scoring.decide(choices, choices_method, conditional, unconditional or None)

    def cache_prefix(self, prefix_str: str) -> None:
        pass  # a plain client has no way to ask for this


class Counted:
    """An Engine that tallies what its requests did (stats() misses requests ended by a stop string)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.requests = self.prompt_tokens = self.cached_tokens = self.generated_tokens = 0

    def generate(self, *args, **kwargs):
        outs = self.engine.generate(*args, **kwargs)
        with self.lock:
            for out in outs if isinstance(outs, list) else [outs]:
                self.requests += 1
                self.prompt_tokens += out.usage.prompt_tokens
                self.cached_tokens += out.usage.cached_tokens
                self.generated_tokens += out.usage.completion_tokens
        return outs

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def _score(start: int) -> dict:
    return {"max_new_tokens": 0, "temperature": 0.0, "prompt_logprobs": True, "logprob_start_len": start}


def measure(program, batch: list[dict], backend, engine: Counted, num_threads) -> dict:
    engine.reset()
    start = time.perf_counter()
    states = program.run_batch(batch, backend=backend, num_threads=num_threads)
    seconds = time.perf_counter() - start
    errors = [repr(st.error()) for st in states if st.error() is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} program(s) failed: {errors[:3]}")
    return {
        "seconds": seconds,
        "programs_per_s": len(batch) / seconds,
        "tokens_per_s": engine.generated_tokens / seconds,
        "generated_tokens": engine.generated_tokens,
        "requests": engine.requests,
        "prompt_tokens": engine.prompt_tokens,
        "computed_prompt_tokens": engine.prompt_tokens - engine.cached_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer programs per workload")
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side; the best is kept (default: %(default)s)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    fast_engine = Counted(Engine(args.model))
    slow_engine = Counted(Engine(args.model, disable_radix_cache=True))
    fast, slow = EngineBackend(fast_engine), SequentialBackend(slow_engine)
    for engine in (fast_engine, slow_engine):  # warm up: first-call allocations, thread pools
        engine.generate("Hello", {"max_new_tokens": 4})

    rows, results = [], []
    for name, program, batch in workloads(args.quick):
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            fast_engine.flush_cache()  # every repeat starts cold: no help from the previous one
            runs = {
                "radixrt": measure(program, batch, fast, fast_engine, "auto"),
                "baseline": measure(program, batch, slow, slow_engine, 1),
            }
            for side, run in runs.items():
                if side not in best or run["seconds"] < best[side]["seconds"]:
                    best[side] = run
        speedup = best["baseline"]["seconds"] / best["radixrt"]["seconds"]
        results.append({"workload": name, "programs": len(batch), **best, "speedup": speedup})
        for side in ("radixrt", "baseline"):
            r = best[side]
            rows.append(
                {
                    "workload": name,
                    "side": side,
                    "programs": len(batch),
                    "programs/s": r["programs_per_s"],
                    "tokens/s": r["tokens_per_s"],
                    "requests": r["requests"],
                    "prompt tok computed": r["computed_prompt_tokens"],
                    "speedup": speedup if side == "radixrt" else "",
                }
            )
        print(f"{name}: {speedup:.1f}x", flush=True)
    load_after = os.getloadavg()
    columns = ["workload", "side", "programs", "programs/s", "tokens/s", "requests", "prompt tok computed", "speedup"]
    print(table(rows, columns))
    print(f"load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} cores")
    path = save(
        "programs",
        {
            "workloads": results,
            "quick": args.quick,
            "nice": os.nice(0),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
    )
    print(f"wrote {path}")
    fast_engine.shutdown()
    slow_engine.shutdown()


if __name__ == "__main__":
    main()
