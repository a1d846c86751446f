"""Engine behaviour on tiny models: batching, chunking, preemption, caching and bad input never change greedy output."""

from __future__ import annotations

import random

import pytest

from radixrt import Engine, SamplingParams

GREEDY = {"max_new_tokens": 24, "min_new_tokens": 24, "temperature": 0}


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randrange(1, 60))] for _ in range(n)]


@pytest.fixture(scope="module")
def solo_outputs(tiny_llama):
    """Each prompt run alone, cache off, no chunking: the reference."""
    with Engine(str(tiny_llama), page_size=4, disable_radix_cache=True, chunked_prefill_size=512) as engine:
        return [engine.generate(input_ids=p, sampling_params=GREEDY).token_ids for p in prompts(12)]


@pytest.mark.parametrize(
    "options",
    [
        {"page_size": 4},  # batched, radix cache on
        {"page_size": 1, "disable_radix_cache": True},
        {"page_size": 16, "chunked_prefill_size": 16},  # prompts split into chunks
        {"page_size": 4, "chunked_prefill_size": 8, "schedule_policy": "fcfs"},
        {"page_size": 4, "kv_memory_gb": 0.00005},  # a pool of a few dozen pages: forces eviction and preemption
    ],
    ids=["batched", "page1-nocache", "chunked16", "chunked8-fcfs", "tiny-pool"],
)
def test_batched_output_equals_solo(tiny_llama, solo_outputs, options):
    with Engine(str(tiny_llama), **options) as engine:
        outs = engine.generate(input_ids=prompts(12), sampling_params=GREEDY)
        stats = engine.stats()
    assert [o.token_ids for o in outs] == solo_outputs
    assert stats.num_running == stats.num_waiting == 0
    assert stats.used_pages == 0 and stats.protected_pages == 0  # nothing leaked or left locked
    if "kv_memory_gb" in options:
        assert stats.total_pages < 12 * 84 // 4  # really smaller than the batch needs at once
        assert stats.num_preemptions > 0 or stats.evicted_tokens > 0


def test_max_total_tokens_sizes_the_pool(tiny_llama):
    with Engine(str(tiny_llama), page_size=4, max_total_tokens=130) as engine:
        stats = engine.stats()
        assert stats.total_pages == 32 and engine.max_context == 128  # whole pages, context capped by the pool
        with pytest.raises(ValueError, match="context"):
            engine.generate(input_ids=[5] * 200)
    with pytest.raises(ValueError, match="max_total_tokens"):
        Engine(str(tiny_llama), page_size=16, max_total_tokens=8)


def test_repeated_prompt_hits_cache(tiny_llama):
    prompt = list(range(3, 103))
    with Engine(str(tiny_llama), page_size=4) as engine:
        first = engine.generate(input_ids=prompt, sampling_params=GREEDY)
        second = engine.generate(input_ids=prompt, sampling_params=GREEDY)
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens >= (len(prompt) // 4) * 4 - 4
    assert second.token_ids == first.token_ids


def test_multi_turn_reuses_reply(tiny_llama):
    turn1 = list(range(3, 50))
    with Engine(str(tiny_llama), page_size=4) as engine:
        reply = engine.generate(input_ids=turn1, sampling_params=GREEDY)
        turn2 = turn1 + reply.token_ids + [7, 8, 9]
        out = engine.generate(input_ids=turn2, sampling_params=GREEDY)
    # The reply's KV was cached too: the hit reaches past the first turn's prompt.
    assert out.usage.cached_tokens > len(turn1)


def test_stop_conditions(tiny_llama):
    with Engine(str(tiny_llama), page_size=4) as engine:
        ref = engine.generate(input_ids=[5, 6, 7], sampling_params=GREEDY)
        stop_tok = ref.token_ids[5]
        out = engine.generate(
            input_ids=[5, 6, 7], sampling_params=dict(GREEDY, min_new_tokens=0, stop_token_ids=[stop_tok])
        )
        assert out.token_ids == ref.token_ids[: ref.token_ids.index(stop_tok) + 1]
        assert out.finish_reason == "stop"
        short = engine.generate(input_ids=[5, 6, 7], sampling_params=dict(GREEDY, max_new_tokens=3, min_new_tokens=0))
        assert short.token_ids == ref.token_ids[:3] and short.finish_reason == "length"
        word = ref.text.split()[4]
        stopped = engine.generate(input_ids=[5, 6, 7], sampling_params=dict(GREEDY, min_new_tokens=0, stop=[word]))
        assert stopped.finish_reason == "stop" and word not in stopped.text
        assert ref.text.startswith(stopped.text)


def test_streaming_equals_generate(tiny_llama):
    with Engine(str(tiny_llama), page_size=4) as engine:
        ref = engine.generate(input_ids=[9, 8, 7], sampling_params=GREEDY)
        chunks = list(engine.generate_stream(input_ids=[9, 8, 7], sampling_params=GREEDY))
    assert "".join(c.text for c in chunks) == ref.text
    assert sum((c.token_ids for c in chunks), []) == ref.token_ids
    assert chunks[-1].finished and chunks[-1].usage.completion_tokens == 24


def test_seeded_sampling_is_reproducible(tiny_llama):
    params = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    with Engine(str(tiny_llama), page_size=4) as engine:
        alone = engine.generate(input_ids=[4, 5, 6], sampling_params=params).token_ids
        together = engine.generate(input_ids=[[4, 5, 6], [10, 11]], sampling_params=[params, {"temperature": 1.0}])
    assert together[0].token_ids == alone


def test_logprobs(tiny_llama):
    with Engine(str(tiny_llama), page_size=4) as engine:
        out = engine.generate(
            input_ids=[4, 5, 6, 7],
            sampling_params={
                "max_new_tokens": 4,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 3,
                "prompt_logprobs": True,
            },
        )
    assert len(out.logprobs) == 4 and all(lp <= 0 for lp in out.logprobs)
    assert all(top[0][0] == tok for top, tok in zip(out.top_logprobs, out.token_ids))  # greedy = the top choice
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 4


@pytest.mark.parametrize(
    "params, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_sampling_params(params, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_any(params)


def test_bad_input_is_rejected_and_engine_keeps_working(tiny_llama):
    with Engine(str(tiny_llama), page_size=4, max_context_len=64) as engine:
        with pytest.raises(ValueError, match="empty"):
            engine.generate("")
        with pytest.raises(ValueError, match="context"):
            engine.generate(input_ids=[5] * 100)
        with pytest.raises(ValueError, match="temperature"):
            engine.generate(input_ids=[5], sampling_params={"temperature": -0.5})
        assert len(engine.generate(input_ids=[5, 6], sampling_params=GREEDY).token_ids) == 24


def test_the_model_runs_on_the_thread_that_loaded_it(tiny_llama, monkeypatch):
    """torch's OpenMP pool belongs to the thread that first uses it: loading on the caller's thread and
    stepping on the loop thread made two pools, and a batch-1 step 2.5x slower (engine.py: _run)."""
    import threading

    from radixrt.worker import worker as worker_module

    threads = {}
    build, step = worker_module.Worker.__init__, worker_module.Worker.step

    def record_build(self, *args, **kwargs):
        threads["build"] = threading.current_thread()
        build(self, *args, **kwargs)

    def record_step(self):
        threads["step"] = threading.current_thread()
        return step(self)

    monkeypatch.setattr(worker_module.Worker, "__init__", record_build)
    monkeypatch.setattr(worker_module.Worker, "step", record_step)
    with Engine(str(tiny_llama), page_size=4) as engine:
        engine.generate(input_ids=[5, 6], sampling_params=GREEDY)
    assert threads["build"] is threads["step"] is not threading.main_thread()


def test_a_model_that_fails_to_load_raises_from_the_constructor(tmp_path):
    with pytest.raises(Exception, match="config|model|found|exist"):
        Engine(str(tmp_path / "no-such-model"))
