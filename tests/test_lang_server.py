"""The DSL's HTTP backends against our own server (`radixrt serve`, tiny model): Runtime starts and
stops it; RuntimeEndpoint and the OpenAI backend give what the in-process Engine gives."""

from __future__ import annotations

import socket

import pytest

import radixrt as sgl
from radixrt import Engine
from radixrt.lang.backend.engine import EngineBackend

KEY = "test-key"
PREFIX = " ".join(f"w{i}" for i in range(10, 50))
CHOICES = ["w7 w8", "w100", "w200 w201 w202"]


class FakeState:
    """What a backend reads from the interpreter: the text so far."""

    def __init__(self, text: str) -> None:
        self.text_ = text


@pytest.fixture(scope="module")
def runtime(tiny_llama):
    rt = sgl.Runtime(model_path=str(tiny_llama), page_size=4, kv_memory_gb=0.05, api_key=KEY, launch_timeout=120)
    yield rt
    rt.shutdown()
    assert rt.process is None and rt.process_rc is not None


@pytest.fixture(scope="module")
def local(tiny_llama):
    with Engine(str(tiny_llama), page_size=4) as engine:
        yield EngineBackend(engine)


@sgl.function
def program(s, prefix, n):
    s += prefix
    s += sgl.gen("first", max_tokens=n, temperature=0, ignore_eos=True)
    s += " w60 " + sgl.select("pick", CHOICES)
    forks = s.fork(2)
    forks += lambda i: f" w{70 + i}" + sgl.gen("leaf", max_tokens=3, temperature=0, ignore_eos=True)
    forks.join()


def test_endpoint_gives_what_the_engine_gives(runtime, local):
    remote = program.run(PREFIX, 5, backend=runtime)
    here = program.run(PREFIX, 5, backend=local)
    assert remote.text() == here.text()
    assert (remote["first"], remote["pick"], remote["leaf"]) == (here["first"], here["pick"], here["leaf"])
    scores = remote.get_meta_info("pick")["normalized_prompt_logprobs"]
    assert scores == pytest.approx(here.get_meta_info("pick")["normalized_prompt_logprobs"], abs=1e-3)
    assert remote.get_meta_info("first")["finish_reason"]["type"] == "length"


def test_endpoint_streams_and_fork_branches_hit_the_cache(runtime):
    @sgl.function
    def tree(s):
        s += PREFIX
        forks = s.fork(2)
        forks += lambda i: f" w{80 + i}" + sgl.gen("leaf", max_tokens=6, temperature=0, ignore_eos=True)
        s["cached"] = [f.get_meta_info("leaf")["cached_tokens"] for f in forks]
        forks.join()

    assert all(c >= 36 for c in tree.run(backend=runtime)["cached"])
    state = program.run(PREFIX, 8, backend=runtime, stream=True)
    assert "".join(state.text_iter("first")) == program.run(PREFIX, 8, backend=runtime)["first"]
    params = sgl.lang.ir.SglSamplingParams(8, ignore_eos=True)
    chunks = list(runtime.endpoint.generate_stream(FakeState(PREFIX), params))
    assert len(chunks) == 8 and chunks[-1][1]["finish_reason"]["type"] == "length"


def test_run_batch_through_the_endpoint(runtime):
    states = program.run_batch([{"prefix": PREFIX + f" w{200 + i}", "n": 2} for i in range(4)], backend=runtime)
    assert all(st.error() is None and len(st["leaf"]) == 2 for st in states)


def test_flush_cache_and_server_info(runtime):
    assert sgl.flush_cache(runtime) is True
    assert sgl.get_server_info(runtime)["healthy"] is True


def test_api_key_is_sent_and_required(runtime):
    with pytest.raises(sgl.BackendError, match="401"):
        sgl.RuntimeEndpoint(runtime.url)
    assert sgl.RuntimeEndpoint(runtime.url, api_key=KEY).model_info["model_path"]


def test_backend_that_is_down_is_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(sgl.BackendError, match="cannot reach the radixrt server"):
        sgl.RuntimeEndpoint(f"http://127.0.0.1:{port}")


def test_runtime_that_fails_to_start_reports_why(tmp_path):
    with pytest.raises(sgl.BackendError, match="exited with code"):
        sgl.Runtime(model_path=str(tmp_path / "no-such-model"), launch_timeout=60)


@pytest.fixture(scope="module")
def openai_chat(runtime):
    model = sgl.get_server_info(runtime)["model"]
    return sgl.OpenAI(model, base_url=runtime.url + "/v1", api_key=KEY)


@pytest.fixture(scope="module")
def openai_completion(runtime):
    model = sgl.get_server_info(runtime)["model"]
    return sgl.OpenAI(model, is_chat_model=False, base_url=runtime.url + "/v1", api_key=KEY)


@sgl.function
def chat(s):
    s += sgl.user("w1 w2 w3")
    s += sgl.assistant(sgl.gen("reply", max_tokens=5, temperature=0, ignore_eos=True))


def test_openai_chat_model_gen_and_stream(openai_chat, local):
    state = chat.run(backend=openai_chat)
    assert state["reply"] == chat.run(backend=local)["reply"]
    assert state.get_meta_info("reply")["completion_tokens"] == 5
    assert "".join(chat.run(backend=openai_chat, stream=True).text_iter("reply")) == state["reply"]


def test_openai_chat_model_needs_gen_right_after_assistant(openai_chat):
    @sgl.function
    def bad(s):
        s += sgl.user("w1") + sgl.assistant_begin() + "w2 " + sgl.gen("x", max_tokens=2)

    with pytest.raises(RuntimeError, match="right after assistant_begin"):
        bad.run(backend=openai_chat)


def test_openai_regex_is_a_clear_error(openai_completion):
    @sgl.function
    def number(s):
        s += "w1" + sgl.gen_int("n")

    with pytest.raises(NotImplementedError, match="cannot constrain"):
        number.run(backend=openai_completion)


@pytest.mark.parametrize("method", [sgl.token_length_normalized, sgl.greedy_token_selection])
def test_openai_completion_model_select_matches_the_engine(openai_completion, local, method):
    @sgl.function
    def pick(s):
        s += PREFIX + " " + sgl.select("pick", CHOICES, choices_method=method)

    remote, here = pick.run(backend=openai_completion), pick.run(backend=local)
    assert remote["pick"] == here["pick"]
    a = remote.get_meta_info("pick")["normalized_prompt_logprobs"]
    assert a == pytest.approx(here.get_meta_info("pick")["normalized_prompt_logprobs"], abs=1e-3)


def test_openai_completion_model_gen(openai_completion, local):
    state = program.run(PREFIX, 4, backend=openai_completion)
    assert state["first"] == program.run(PREFIX, 4, backend=local)["first"]
