"""An SGLang frontend program ported by changing its import: SGLang's Engine arguments and output
dicts, gen(n=...), gen(stop_regex=...), text_async_iter, Runtime(**server_args) by SGLang's names.
The tiny random model: outputs are gibberish words (`w17 w203 ...`); the assertions are about
what reaches the engine and what comes back."""

from __future__ import annotations

import asyncio
import re

import pytest

import radixrt as sgl

PROMPT = " ".join(f"w{i}" for i in range(10, 30))
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_llama):
    """Built as SGLang's offline Engine is: model_path, context_length, random_seed, log_level."""
    with sgl.Engine(model_path=str(tiny_llama), context_length=200, random_seed=3, log_level="error",
                    page_size=4, num_threads=1) as engine:  # fmt: skip
        yield engine


def test_engine_takes_sglang_argument_names(engine, tiny_llama):
    assert engine.config.model == str(tiny_llama) and engine.max_context == 200 and engine.config.seed == 3
    with pytest.raises(ValueError, match="did you mean context_length"):
        sgl.Engine(model_path=str(tiny_llama), context_lenght=100)


def test_generate_reads_as_sglang_dicts(engine):
    outs = engine.generate([PROMPT, PROMPT + " w5"], {"max_new_tokens": 4, **GREEDY})
    for out in outs:  # SGLang: for output in llm.generate(prompts, sampling_params): output["text"]
        assert out["text"] == out.text and out["output_ids"] == out.token_ids
        meta = out["meta_info"]
        assert meta["completion_tokens"] == 4 and meta["finish_reason"] == {"type": "length", "length": 4}
        assert meta["prompt_tokens"] == len(out.prompt_token_ids) and meta["e2e_latency"] > 0 and meta["id"]
    assert set(outs[0].keys()) == {"text", "output_ids", "meta_info"}
    with pytest.raises(KeyError, match="meta_info"):
        outs[0]["usage"]
    stopped = engine.generate(PROMPT, {"max_new_tokens": 6, "stop": outs[0].text.split()[1], **GREEDY})
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": outs[0].text.split()[1]}


def test_engine_n_samples(engine):
    outs = engine.generate(PROMPT, {"max_new_tokens": 6, "temperature": 1.0, "n": 3, "seed": 11})
    assert len(outs) == 3 and len({o.text for o in outs}) == 3
    again = engine.generate(PROMPT, {"max_new_tokens": 6, "temperature": 1.0, "n": 3, "seed": 11})
    assert [o.text for o in again] == [o.text for o in outs]
    assert engine.generate(PROMPT, {"max_new_tokens": 6, "temperature": 1.0, "seed": 12}).text == outs[1].text


@sgl.function
def continue_text(s, prompt, gen_args):
    s += prompt
    s += sgl.gen("out", **gen_args)
    s += " w99"


def test_gen_n_holds_every_sample_and_continues_with_the_first(engine):
    state = continue_text.run(PROMPT, {"max_tokens": 4, "n": 2, "temperature": 1.0}, backend=engine)
    samples, metas = state["out"], state.get_meta_info("out")
    assert isinstance(samples, list) and len(samples) == 2 and samples[0] != samples[1]
    assert [m["completion_tokens"] for m in metas] == [4, 4]
    assert state.text() == PROMPT + samples[0] + " w99"
    with pytest.raises(ValueError, match="n must be an integer"):
        sgl.gen("x", n=0)


def test_gen_stop_regex_ends_the_text(engine):
    words = engine.generate(PROMPT, {"max_new_tokens": 6, **GREEDY}).text.split()
    pattern = re.escape(words[2]) + r"\b"
    state = continue_text.run(PROMPT, {"max_tokens": 6, "stop_regex": pattern, **GREEDY}, backend=engine)
    assert state["out"] == " ".join(words[:2]) + " "
    assert state.get_meta_info("out")["finish_reason"]["type"] == "stop"
    with pytest.raises(ValueError, match="does not compile"):
        sgl.gen("x", stop_regex="(")


def test_text_async_iter_streams_to_asyncio_code(engine):
    """The pieces, their meta info, and an event loop that keeps running while they are awaited."""
    state = continue_text.run(PROMPT, {"max_tokens": 64, **GREEDY}, backend=engine, stream=True)

    async def read() -> tuple[list[str], list, int]:
        ticks, done = 0, False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        pieces, metas = [], []
        async for piece, meta in state.text_async_iter("out", return_meta_data=True):
            pieces.append(piece)
            metas.append(meta)
        done = True
        await task
        return pieces, metas, ticks

    pieces, metas, ticks = asyncio.run(read())
    assert "".join(pieces) == state["out"] and metas[-1]["completion_tokens"] == 64
    assert ticks > 1  # the waits ran off the event loop

    async def whole_text() -> str:
        return "".join([piece async for piece in state.text_async_iter()])

    assert asyncio.run(whole_text()) == state.text()


def test_runtime_passes_sglang_server_args(tiny_llama):
    runtime = sgl.Runtime(model_path=str(tiny_llama), context_length=128, mem_fraction_static=0.02,
                          max_total_tokens=1024, random_seed=5, enable_metrics=True, tp_size=1, page_size=4,
                          num_threads=1, launch_timeout=180)  # fmt: skip
    try:
        info = sgl.get_server_info(runtime)
        assert info["context_length"] == 128 and info["random_seed"] == 5 and info["mem_fraction_static"] == 0.02
        state = continue_text.run(PROMPT, {"max_tokens": 3, "n": 2, "temperature": 1.0}, backend=runtime)
        assert len(state["out"]) == 2
        assert sgl.flush_cache(runtime) is True
    finally:
        runtime.shutdown()
    with pytest.raises(sgl.BackendError, match="unknown flag --tokenizer-path"):
        sgl.Runtime(model_path=str(tiny_llama), tokenizer_path=str(tiny_llama), launch_timeout=60)
