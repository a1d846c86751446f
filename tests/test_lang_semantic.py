"""End-to-end checks on the default model (SmolLM2-135M-Instruct): programs whose answers the
model knows, the chat template it was trained with, and constrained gen."""

from __future__ import annotations

import json
import re

import pytest

import radixrt as sgl

pytestmark = pytest.mark.slow

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome", "Japan": "Tokyo"}


@pytest.fixture
def backend(default_engine):
    return sgl.lang.backend.registry.resolve_backend(default_engine)


@sgl.function
def ask(s, question, max_tokens=16):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0))


def test_capital_of_france_is_paris(backend, default_engine):
    state = ask.run("What is the capital of France?", backend=backend)
    assert "Paris" in state["answer"]
    # The text is exactly what the model's own chat template makes of the messages (ChatML + default system).
    assert state.text() == default_engine.render_chat(state.messages(), add_generation_prompt=False)
    assert state.text().startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.parametrize(
    "method", [sgl.token_length_normalized, sgl.greedy_token_selection, sgl.unconditional_likelihood_normalized]
)
def test_select_picks_the_right_capital(backend, method):
    @sgl.function
    def capital(s, country):
        s += sgl.user(f"What is the capital of {country}?")
        city = sgl.select("city", list(CAPITALS.values()), choices_method=method)
        s += sgl.assistant(f"The capital of {country} is " + city)

    states = capital.run_batch([{"country": c} for c in CAPITALS], backend=backend)
    assert [st["city"] for st in states] == list(CAPITALS.values())


def test_streaming_a_real_answer(backend):
    state = ask.run("Name three colors.", 12, backend=backend, stream=True)
    pieces = list(state.text_iter("answer"))
    assert len(pieces) > 1 and "".join(pieces) == state["answer"]


def test_fork_answers_each_branch(backend):
    @sgl.function
    def capitals(s):
        s += sgl.system("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        forks = s.fork(3)
        forks += lambda i: sgl.user(f"What is the capital of {['France', 'Germany', 'Japan'][i]}?")
        forks += sgl.assistant(sgl.gen("city", max_tokens=6, temperature=0))
        forks.join()

    cities = capitals.run(backend=backend)["city"]
    assert [c in answer for c, answer in zip(["Paris", "Berlin", "Tokyo"], cities)] == [True] * 3, cities


def test_gen_regex(backend):
    state = ask.run("Give me a US phone number.", backend=backend)
    assert state["answer"]  # unconstrained, anything goes

    @sgl.function
    def phone(s):
        s += sgl.user("Give me a US phone number.")
        s += sgl.assistant(sgl.gen("phone", regex=r"\(\d{3}\) \d{3}-\d{4}", max_tokens=20, temperature=0))

    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", phone.run(backend=backend)["phone"])


def test_gen_dtypes(backend):
    @sgl.function
    def facts(s):
        s += sgl.user("How many legs does a spider have? Is the sun a star? What is pi?")
        s += sgl.assistant_begin()
        s += "Legs: " + sgl.gen_int("legs", max_tokens=4) + "\n"
        s += "Star: " + sgl.gen("star", dtype=bool, max_tokens=4) + "\n"
        s += "Pi: " + sgl.gen("pi", dtype=float, max_tokens=8) + "\n"
        s += "Name: " + sgl.gen_string("name", max_tokens=12)
        s += sgl.assistant_end()

    state = facts.run(backend=backend, temperature=0)
    assert int(state["legs"]) == 8
    assert state["star"] in ("True", "False")
    float(state["pi"])
    assert re.fullmatch(r'"[\w\d\s]*"', state["name"])


def test_gen_json_schema(backend):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
    }

    @sgl.function
    def where(s):
        s += sgl.user("Where is the Eiffel Tower? Answer in JSON.")
        s += sgl.assistant(sgl.gen("json", json_schema=json.dumps(schema), max_tokens=40, temperature=0))

    record = json.loads(where.run(backend=backend)["json"])
    assert set(record) == {"city", "country"} and record["city"] == "Paris"
