"""Interpreter mechanics on a scripted backend (no model): state, roles, fork/join, streaming,
run_batch, prefix caching requests, and the error cases. Each test states its rule in its name."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

import radixrt as sgl
from radixrt.lang import ir
from radixrt.lang.backend.base import BaseBackend
from radixrt.lang.chat_template import ChatTemplate
from radixrt.lang.choices import ChoicesDecision

TEMPLATE = ChatTemplate(
    {"system": ("<sys>", "</sys>\n"), "user": ("<user>", "</user>\n"), "assistant": ("<asst>", "</asst>\n")},
    preamble="<bos>",
)


class ScriptedBackend(BaseBackend):
    """Answers gen with `reply(prompt, params)`; records every call. Thread-safe."""

    def __init__(self, reply=None, delay: float = 0.0) -> None:
        self.chat_template = TEMPLATE
        self.reply = reply or (lambda prompt, params: "ok")
        self.delay = delay
        self.calls: list[tuple[str, object]] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def _record(self, kind: str, value) -> None:
        with self.lock:
            self.calls.append((kind, value))

    def generate(self, s, sampling_params):
        self._record("gen", (s.text_, sampling_params))
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        return self.reply(s.text_, sampling_params), {"prompt_tokens": len(s.text_)}

    def generate_stream(self, s, sampling_params):
        text, meta = self.generate(s, sampling_params)
        for word in text.split(" "):
            time.sleep(0.01)
            yield word + " ", meta

    def select(self, s, choices, temperature, choices_method):
        self._record("select", (s.text_, list(choices)))
        return ChoicesDecision(choices[-1], {"scores": [0.0] * len(choices)})

    def cache_prefix(self, prefix_str):
        self._record("cache", prefix_str)

    def flush_cache(self):
        return True

    def kinds(self, kind: str) -> list:
        return [v for k, v in self.calls if k == kind]


@pytest.fixture
def backend():
    return ScriptedBackend()


def test_iadd_text_expr_and_concatenation(backend):
    @sgl.function
    def prog(s, name):
        s += "Hello, " + name + "!"
        s += " Reply:" + sgl.gen("reply", max_tokens=5)

    state = prog.run(name="Ada", backend=backend)
    assert state.text() == "Hello, Ada! Reply:ok"
    assert state["reply"] == "ok" and "reply" in state
    assert backend.kinds("gen")[0][0] == "Hello, Ada! Reply:"


def test_gen_overrides_run_defaults(backend):
    @sgl.function
    def prog(s):
        s += "x" + sgl.gen("a", max_tokens=3, stop="\n", top_k=5) + sgl.gen("b")

    prog.run(backend=backend, max_new_tokens=7, temperature=0.3, stop=["END"])
    (_, a), (_, b) = backend.kinds("gen")
    assert (a.max_new_tokens, a.stop, a.top_k, a.temperature) == (3, "\n", 5, 0.3)
    assert (b.max_new_tokens, b.stop, b.top_k, b.temperature) == (7, ["END"], -1, 0.3)


def test_every_gen_param_reaches_the_engine_params():
    g = sgl.gen(
        "x", max_tokens=9, min_tokens=2, stop=["a"], stop_token_ids=[5], temperature=0.5, top_p=0.9, top_k=4,
        min_p=0.1, frequency_penalty=0.2, presence_penalty=0.3, ignore_eos=True, json_schema={"type": "object"},
    )  # fmt: skip
    params = ir.SglSamplingParams().override(g.params).to_engine()
    assert params == {
        "max_new_tokens": 9, "min_new_tokens": 2, "stop": ["a"], "stop_token_ids": [5], "temperature": 0.5,
        "top_p": 0.9, "top_k": 4, "min_p": 0.1, "frequency_penalty": 0.2, "presence_penalty": 0.3,
        "ignore_eos": True, "json_schema": '{"type": "object"}',
    }  # fmt: skip
    from radixrt import SamplingParams

    SamplingParams.from_any(params)  # every name is one the engine knows


@pytest.mark.parametrize(
    "expr, regex, extra_stop",
    [
        (sgl.gen("n", dtype=int), ir.REGEX_INT, [" ", "\n"]),
        (sgl.gen_int("n"), ir.REGEX_INT, [" ", "\n"]),
        (sgl.gen("n", dtype="float"), ir.REGEX_FLOAT, [" ", "\n"]),
        (sgl.gen("n", dtype=bool), ir.REGEX_BOOL, []),
        (sgl.gen_string("n"), ir.REGEX_STR, []),
        (sgl.gen("n", regex=r"\d{3}"), r"\d{3}", []),
    ],
)
def test_dtype_becomes_sglang_regex(expr, regex, extra_stop):
    params = ir.SglSamplingParams().override(expr.params).to_engine()
    assert params["regex"] == regex and params["stop"] == extra_stop


def test_gen_rejects_bad_arguments_early():
    with pytest.raises(ValueError, match="dtype"):
        sgl.gen("x", dtype=list)
    with pytest.raises(ValueError, match="does not compile"):
        sgl.gen("x", regex="(")
    with pytest.raises(ValueError, match="at most one"):
        sgl.gen("x", regex="a", json_schema="{}")
    with pytest.raises(ValueError, match="n must be an integer"):
        sgl.gen("x", n=0)
    with pytest.raises(ValueError, match="stop_regex"):
        sgl.gen("x", stop_regex="(")


def test_gen_with_choices_is_select():
    expr = sgl.gen("x", choices=["a", "b"], choices_method=sgl.greedy_token_selection)
    assert isinstance(expr, ir.Select) and expr.choices_method is sgl.greedy_token_selection
    assert sgl.select("x", ["a"]).choices_method is sgl.token_length_normalized


def test_select_without_choices_is_a_clear_error():
    with pytest.raises(ValueError, match="non-empty list of choices"):
        sgl.select("x", [])
    with pytest.raises(ValueError, match="non-empty list of choices"):
        sgl.select("x")
    with pytest.raises(ValueError, match="non-empty strings"):
        sgl.select("x", ["a", ""])


def test_select_appends_decision_and_sets_variable(backend):
    @sgl.function
    def prog(s):
        s += "Pick: " + sgl.select("pick", ["red", "blue"]) + "."

    state = prog.run(backend=backend)
    assert state["pick"] == "blue" and state.text() == "Pick: blue."
    assert state.get_meta_info("pick") == {"scores": [0.0, 0.0]}


def test_roles_render_template_and_messages(backend):
    @sgl.function
    def prog(s):
        s += sgl.system("Be brief.")
        s += sgl.user("Hi")
        s += sgl.assistant(sgl.gen("a"))
        with s.user():
            s += "Again"
        s += sgl.assistant_begin() + "Sure: " + sgl.gen("b") + sgl.assistant_end()
        s.user("Bye")

    state = prog.run(backend=backend)
    assert state.text() == (
        "<sys>Be brief.</sys>\n<user>Hi</user>\n<asst>ok</asst>\n<user>Again</user>\n<asst>Sure: ok</asst>\n"
        "<user>Bye</user>\n"
    )
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert state.messages()[4]["content"] == "Sure: ok"


def test_preamble_goes_before_a_first_non_system_message(backend):
    @sgl.function
    def prog(s):
        s += sgl.user_begin() + "Q" + sgl.user_end()

    assert prog.run(backend=backend).text() == "<bos><user>Q</user>\n"


def test_nested_or_unmatched_roles_fail_clearly(backend):
    @sgl.function
    def nested(s):
        s += sgl.user_begin() + sgl.assistant_begin()

    with pytest.raises(ValueError, match="roles do not nest"):
        nested.run(backend=backend)

    @sgl.function
    def unmatched(s):
        s += sgl.user_end()

    with pytest.raises(ValueError, match="without a matching"):
        unmatched.run(backend=backend)


def test_var_scope_captures_text(backend):
    @sgl.function
    def prog(s):
        s += "A "
        with s.var_scope("middle"):
            s += "B " + sgl.gen("g")
        s += " C"

    state = prog.run(backend=backend)
    assert state["middle"] == "B ok" and state.text() == "A B ok C"


def test_unknown_variable_is_a_clear_error(backend):
    @sgl.function
    def prog(s):
        s += "x" + sgl.gen("known")

    state = prog.run(backend=backend)
    with pytest.raises(sgl.VariableNotFoundError, match="no variable 'nope'.*'known'"):
        state["nope"]
    with pytest.raises(KeyError):  # also a KeyError, as a dict lookup would be
        state["nope"]


def test_fork_caches_the_prefix_once_then_runs_branches_concurrently():
    backend = ScriptedBackend(reply=lambda p, sp: p[-1], delay=0.2)

    @sgl.function
    def prog(s):
        s += "Shared prefix."
        forks = s.fork(3)
        forks += lambda i: f" Branch {i}:" + sgl.gen("out")
        forks.join()

    start = time.monotonic()
    state = prog.run(backend=backend)
    assert backend.kinds("cache") == ["Shared prefix."]
    assert backend.max_active == 3  # all three branches were in flight together
    assert time.monotonic() - start < 0.5  # not 3 x 0.2 s one after another
    assert state["out"] == [":", ":", ":"]
    assert sorted(p for p, _ in backend.kinds("gen")) == [f"Shared prefix. Branch {i}:" for i in range(3)]
    assert state.text() == "Shared prefix."  # gather_variable leaves the parent's text alone


def test_fork_accepts_expr_list_and_loop_append(backend):
    @sgl.function
    def prog(s):
        s += "P"
        forks = s.fork(2)
        forks += "-"  # the same text for every branch
        forks += ["a", "b"]  # one item per branch
        for f in forks:
            f += sgl.gen("g")
        forks.join("concate_and_append")

    state = prog.run(backend=backend)
    assert state.text() == "P-aok-bok"
    with pytest.raises(ValueError, match="2 items for 3 branches"):
        sgl.lang.ProgramStateGroup([None] * 3).__iadd__(["a", "b"])


def test_join_gathers_new_variables_as_lists_in_branch_order():
    backend = ScriptedBackend(reply=lambda p, sp: p.split()[-1])

    @sgl.function
    def prog(s):
        s += "go" + sgl.gen("first")
        forks = s.fork(3)
        forks += lambda i: f" x{i}" + sgl.gen("answer")
        forks.join()

    state = prog.run(backend=backend)
    assert state["first"] == "go"  # existed before the fork: not gathered
    assert state["answer"] == ["x0", "x1", "x2"]


def test_fork_before_any_text_is_a_clear_error(backend):
    @sgl.function
    def prog(s):
        s.fork(2)

    with pytest.raises(ValueError, match="fork\\(\\) needs text"):
        prog.run(backend=backend)


def test_gen_on_empty_state_is_a_clear_error(backend):
    @sgl.function
    def prog(s):
        s += sgl.gen("x")

    with pytest.raises(ValueError, match="needs text before it"):
        prog.run(backend=backend)


def test_streaming_yields_pieces_of_a_variable_and_the_text():
    backend = ScriptedBackend(reply=lambda p, sp: "one two three")

    @sgl.function
    def prog(s):
        s += "Count:"
        s += sgl.gen("words")
        s += " done"

    state = prog.run(backend=backend, stream=True)
    pieces = list(state.text_iter("words"))
    assert len(pieces) > 1 and "".join(pieces) == "one two three "
    assert "".join(prog.run(backend=backend, stream=True).text_iter()) == "Count:one two three  done"
    assert list(prog.run(backend=backend).text_iter("words")) == ["one two three"]  # not streaming: one piece


def test_run_batch_keeps_order_and_isolates_failures(backend):
    @sgl.function
    def prog(s, x):
        if x == 3:
            raise RuntimeError("bad input 3")
        s += f"item {x}:" + sgl.gen("y")

    states = prog.run_batch([{"x": i} for i in range(6)], num_threads=3, backend=backend)
    errors = [type(st.error()).__name__ if st.error() else None for st in states]
    assert errors == [None, None, None, "RuntimeError", None, None]
    assert [st.text() for i, st in enumerate(states) if i != 3] == [f"item {i}:ok" for i in (0, 1, 2, 4, 5)]
    with pytest.raises(sgl.ProgramError, match="bad input 3"):
        states[3]["y"]


def test_run_batch_accepts_positional_arguments_and_progress_bar(backend, capsys):
    @sgl.function
    def prog(s, a, b="B"):
        s += a + b + sgl.gen("g")

    states = prog.run_batch([("1",), ("2", "C")], progress_bar=True, backend=backend)
    assert [st.text() for st in states] == ["1Bok", "2Cok"]
    assert "2/2" in capsys.readouterr().err
    with pytest.raises(TypeError, match="do not match"):
        prog.run_batch([()], backend=backend)


def test_run_batch_precaches_the_common_prefix_it_traces(backend):
    shots = "Q: 1+1? A: 2\n" * 8

    @sgl.function
    def prog(s, q):
        s += shots
        s += "Q: " + q + " A:" + sgl.gen("a")

    prog.run_batch([{"q": f"{i}+{i}?"} for i in range(5)], backend=backend)
    assert backend.kinds("cache") == [shots + "Q: "]  # traced on the inputs, cut where they differ
    prog.run_batch([{"q": "x"}], backend=backend)
    assert len(backend.kinds("cache")) == 1  # a single program has nothing to share


def test_failing_backend_error_is_raised_by_run_and_kept_by_run_batch():
    class Down(ScriptedBackend):
        def generate(self, s, sampling_params):
            raise sgl.BackendError("cannot reach the server")

    @sgl.function
    def prog(s):
        s += "x" + sgl.gen("y") + "never"

    with pytest.raises(sgl.BackendError, match="cannot reach"):
        prog.run(backend=Down())
    (state,) = prog.run_batch([{}], backend=Down())
    assert isinstance(state.error(), sgl.BackendError) and state.text() == "x"


def test_default_backend_and_flush_cache(backend):
    from radixrt.lang.backend import registry

    saved = registry._default_backend
    try:
        registry._default_backend = None
        assert sgl.flush_cache() is False
        with pytest.raises(ValueError, match="no backend"):
            sgl.function(lambda s: None).run()
        sgl.set_default_backend(backend)
        assert sgl.flush_cache() is True
        assert sgl.function(lambda s: None).run().text() == ""
        with pytest.raises(TypeError, match="not a backend"):
            sgl.set_default_backend(object())
    finally:
        registry._default_backend = saved


def test_bind_and_call(backend):
    @sgl.function
    def prog(s, a, b):
        s += a + b

    assert prog.bind(b="!")(a="hi", backend=backend).text() == "hi!"
    with pytest.raises(TypeError, match="no argument"):
        prog.bind(c=1)


def test_import_radixrt_stays_light():
    code = "import sys, radixrt; radixrt.gen; radixrt.function; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sglang_names_are_exported():
    for name in [
        "function", "gen", "gen_int", "gen_string", "select", "system", "user", "assistant", "system_begin",
        "system_end", "user_begin", "user_end", "assistant_begin", "assistant_end", "set_default_backend",
        "flush_cache", "get_server_info", "RuntimeEndpoint", "Runtime", "OpenAI", "token_length_normalized",
        "greedy_token_selection", "unconditional_likelihood_normalized",
    ]:  # fmt: skip
        assert getattr(sgl, name) is not None, name
    assert sgl.choices.token_length_normalized is sgl.token_length_normalized
