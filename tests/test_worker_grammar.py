"""Grammars through the whole worker: a hostile schema never holds up other requests, its errors
carry their HTTP status, and a request that leaves cancels its compile (default model: the
grammar engine needs a real tokenizer)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from radixrt import ipc
from radixrt.config import EngineConfig
from radixrt.frontend.errors import RequestError
from radixrt.sampling_params import SamplingParams
from radixrt.worker.worker import Worker

pytestmark = pytest.mark.slow

PLAIN = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
# normalize() took 17 s on this before the preparation was made linear and moved to a process.
HOSTILE = json.dumps({"oneOf": [{"const": i} for i in range(3000)]})


def test_a_hostile_schema_does_not_stall_a_plain_request(default_engine):
    default_engine.generate("Warm up.", PLAIN)
    slow = threading.Thread(
        target=default_engine.generate, args=("Pick a number.", {"max_new_tokens": 4, "json_schema": HOSTILE})
    )
    slow.start()
    start = time.monotonic()
    out = default_engine.generate("Name a colour.", PLAIN)
    waited = time.monotonic() - start
    slow.join(60)
    assert len(out.token_ids) == 8
    assert waited < 8, f"a plain 8-token request took {waited:.1f} s beside a hostile schema"


def test_grammar_errors_keep_their_status(default_engine):
    too_big = json.dumps({"anyOf": [{"const": i} for i in range(5000)]})  # 4,096 alternatives at most
    with pytest.raises(RequestError) as info:
        default_engine.generate("Hi.", {"max_new_tokens": 4, "json_schema": too_big})
    assert info.value.status == 413 and "max_alternatives" in info.value.message
    with pytest.raises(RequestError) as info:
        default_engine.generate("Hi.", {"max_new_tokens": 4, "regex": "(unclosed"})
    assert info.value.status == 400


def test_a_request_that_leaves_cancels_its_compile():
    worker = Worker(EngineConfig(max_total_tokens=4096))
    try:
        compiler = worker.grammars.compiler
        compiler.start().result(60)
        spec = json.dumps({"oneOf": [{"const": f"v{i}"} for i in range(4000)]})
        params = SamplingParams(max_new_tokens=4, json_schema=spec)
        worker.handle(ipc.GenerateReq("leaver", [1, 2, 3], params))
        assert worker.grammars.compiling  # waiting outside the scheduler while it compiles
        worker.handle(ipc.AbortReq("leaver"))
        (out,) = worker.step()
        assert out.finished and out.finish_reason == "abort"
        assert not worker.grammars.compiling and compiler.stats.cancelled == 1
    finally:
        worker.close()
