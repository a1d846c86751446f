"""The DSL on an in-process Engine with the tiny random model: parameters reach the engine,
select scores what a plain uncached request scores, and fork / run_batch / select reuse the
radix cache. Outputs are gibberish words (`w17 w203 ...`); the assertions are about mechanics."""

from __future__ import annotations

import pytest

import radixrt as sgl
from radixrt import Engine
from radixrt.lang.backend.engine import EngineBackend

PREFIX = " ".join(f"w{i}" for i in range(10, 50))  # 40 tokens: ten pages of 4
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def engine(tiny_llama):
    with Engine(str(tiny_llama), page_size=4) as engine:
        yield engine


@pytest.fixture
def backend(engine):
    engine.flush_cache()
    return EngineBackend(engine)


def generate(engine, prompt: str, **params):
    return engine.generate(prompt, {"max_new_tokens": 8, **GREEDY, **params})


@sgl.function
def continue_text(s, prompt, gen_args):
    s += prompt
    s += sgl.gen("out", **{"temperature": 0, **gen_args})


@pytest.mark.parametrize(
    "gen_args",
    [
        {"max_tokens": 6},
        {"max_tokens": 8, "min_tokens": 8, "ignore_eos": True},
        {"max_tokens": 6, "top_k": 1, "temperature": 1.0},  # top-1 of anything is greedy
        {"max_tokens": 6, "min_p": 1.0, "temperature": 1.0},
        {"max_tokens": 6, "top_p": 0.5, "presence_penalty": 1.5, "frequency_penalty": 0.5},
    ],
    ids=["max_tokens", "min_tokens", "top_k", "min_p", "penalties"],
)
def test_gen_params_reach_the_engine(engine, backend, gen_args):
    """The DSL's gen gives exactly what Engine.generate gives for the same params."""
    state = continue_text.run(PREFIX, gen_args, backend=backend)
    names = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}
    expected = generate(engine, PREFIX, **{names.get(k, k): v for k, v in gen_args.items()})
    assert state["out"] == expected.text
    assert state.get_meta_info("out")["completion_tokens"] == len(expected.token_ids)
    if "min_tokens" in gen_args:
        assert len(expected.token_ids) == 8


def test_stop_string_and_stop_token_id(engine, backend):
    full = generate(engine, PREFIX, max_new_tokens=8, ignore_eos=True)
    words = full.text.split()
    stop_word = words[3]
    state = continue_text.run(PREFIX, {"max_tokens": 8, "stop": stop_word}, backend=backend)
    assert stop_word not in state["out"] and full.text.startswith(state["out"])
    state = continue_text.run(PREFIX, {"max_tokens": 8, "stop_token_ids": [full.token_ids[2]]}, backend=backend)
    assert state.get_meta_info("out")["completion_tokens"] <= 3


def test_return_logprob_meta(backend):
    args = {"max_tokens": 5, "ignore_eos": True, "return_logprob": True, "top_logprobs_num": 3}
    state = continue_text.run(PREFIX, args, backend=backend)
    meta = state.get_meta_info("out")
    assert len(meta["output_token_logprobs"]) == 5 == len(meta["output_top_logprobs"])
    lp, token, _ = meta["output_token_logprobs"][0]
    assert lp <= 0 and meta["output_top_logprobs"][0][0][1] == token  # greedy: the top alternative was chosen


def test_streaming_gives_the_same_text(backend):
    args = {"max_tokens": 8, "ignore_eos": True}
    pieces = list(continue_text.run(PREFIX, args, backend=backend, stream=True).text_iter("out"))
    assert "".join(pieces) == continue_text.run(PREFIX, args, backend=backend)["out"]

    class State:
        text_ = PREFIX

    chunks = list(backend.generate_stream(State, sgl.lang.ir.SglSamplingParams(8, temperature=0, ignore_eos=True)))
    assert len(chunks) == 8 and chunks[-1][1]["completion_tokens"] == 8  # one piece per token


CHOICES = ["w7 w8", "w100", "w200 w201 w202", "w9"]


@pytest.mark.parametrize(
    "method", [sgl.token_length_normalized, sgl.greedy_token_selection, sgl.unconditional_likelihood_normalized]
)
def test_select_scores_equal_an_uncached_full_computation(engine, backend, method):
    """Scores computed from the cached prefix equal each choice's log-probs computed from scratch."""

    @sgl.function
    def pick(s):
        s += PREFIX + " "
        s += sgl.select("pick", CHOICES, choices_method=method)

    state = pick.run(backend=backend)
    meta = state.get_meta_info("pick")
    n_prefix = len(engine.tokenizer.encode(PREFIX + " ", add_special_tokens=False))
    for choice, got in zip(CHOICES, meta["input_token_logprobs"]):
        full = engine.generate(PREFIX + " " + choice, {"max_new_tokens": 0, "prompt_logprobs": True})
        assert [t[0] for t in got] == pytest.approx(full.prompt_logprobs[n_prefix:], abs=1e-4)
    expected = {
        sgl.token_length_normalized: "normalized_prompt_logprobs",
        sgl.unconditional_likelihood_normalized: "normalized_unconditional_prompt_logprobs",
    }.get(method)
    if expected:
        scores = meta[expected]
        assert state["pick"] == CHOICES[scores.index(max(scores))]
    assert state.text() == PREFIX + " " + state["pick"]


def test_select_reuses_the_cached_prefix(engine, backend):
    @sgl.function
    def pick(s):
        s += PREFIX + " "
        s += sgl.select("pick", CHOICES)

    before = engine.stats()
    pick.run(backend=backend)
    after = engine.stats()
    hits = after.hit_tokens - before.hit_tokens
    # One batched request: the first choice computes the 40-token prefix, the other 3 hit >= 36 of it.
    assert after.num_finished - before.num_finished == 4
    assert hits >= 3 * 36


def test_fork_meta_shows_cached_tokens(backend):
    @sgl.function
    def tree(s):
        s += PREFIX
        forks = s.fork(3)
        forks += lambda i: f" w{60 + i}" + sgl.gen("leaf", max_tokens=4, temperature=0)
        s["cached"] = [f.get_meta_info("leaf")["cached_tokens"] for f in forks]
        forks.join()

    assert all(c >= 36 for c in tree.run(backend=backend)["cached"])


def test_run_batch_programs_hit_the_precached_prefix(backend):
    @sgl.function
    def qa(s, q):
        s += PREFIX + " " + q
        s += sgl.gen("a", max_tokens=3, temperature=0)
        s["cached"] = s.get_meta_info("a")["cached_tokens"]

    states = qa.run_batch([{"q": f"w{200 + i}"} for i in range(8)], num_threads=8, backend=backend)
    assert all(st.error() is None for st in states)
    assert all(st["cached"] >= 36 for st in states)  # none recomputed the shared 40 tokens


def test_multi_call_program_reuses_its_own_previous_calls(backend):
    @sgl.function
    def chat(s):
        s += PREFIX
        for i in range(3):
            s += f" w{100 + i}" + sgl.gen(f"a{i}", max_tokens=4, temperature=0, ignore_eos=True)

    state = chat.run(backend=backend)
    first, last = state.get_meta_info("a0"), state.get_meta_info("a2")
    assert first["cached_tokens"] == 0
    assert last["cached_tokens"] >= last["prompt_tokens"] - 8  # all but the boundary pages were cached


def test_roles_use_the_tiny_models_template(engine, backend):
    @sgl.function
    def chat(s):
        s += sgl.system("w1 w2")
        s += sgl.user("w3 w4")
        s += sgl.assistant(sgl.gen("reply", max_tokens=4, temperature=0))

    state = chat.run(backend=backend)
    assert state.text() == engine.render_chat(state.messages(), add_generation_prompt=False)


def test_logprob_start_len_serves_the_prefix_from_cache(engine):
    """Engine change for select: prompt log-probs from a start position; the prefix before it may be cached."""
    ids = list(range(3, 63))
    full = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0, "prompt_logprobs": True})
    engine.generate(input_ids=ids[:40], sampling_params={"max_new_tokens": 0})
    part = engine.generate(
        input_ids=ids, sampling_params={"max_new_tokens": 0, "prompt_logprobs": True, "logprob_start_len": 41}
    )
    assert part.usage.cached_tokens == 40
    assert len(part.prompt_logprobs) == len(ids)
    assert part.prompt_logprobs[:41] == [None] * 41
    assert part.prompt_logprobs[41:] == pytest.approx(full.prompt_logprobs[41:], abs=1e-4)
    with pytest.raises(ValueError, match="logprob_start_len"):
        engine.generate(input_ids=ids, sampling_params={"prompt_logprobs": True, "logprob_start_len": -1})


def test_engine_is_accepted_as_a_backend(engine):
    assert sgl.lang.backend.registry.resolve_backend(engine) is sgl.lang.backend.registry.resolve_backend(engine)
    state = continue_text.run(PREFIX, {"max_tokens": 2}, backend=engine)
    assert state.get_meta_info("out")["completion_tokens"] <= 2


def test_dead_engine_is_a_clear_error(tiny_llama):
    from radixrt.engine import EngineDeadError

    engine = Engine(str(tiny_llama), page_size=4)
    engine.shutdown()
    with pytest.raises(EngineDeadError, match="shut down"):
        continue_text.run(PREFIX, {"max_tokens": 2}, backend=engine)
