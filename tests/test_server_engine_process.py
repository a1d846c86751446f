"""`Engine(worker_process=True)`: the offline API over the server's ZMQ worker process."""

from __future__ import annotations

import os
import random
import signal

import pytest

from radixrt import Engine
from radixrt.engine import EngineDeadError

GREEDY = {"max_new_tokens": 12, "min_new_tokens": 12, "temperature": 0}


def test_worker_process_matches_inline_and_cleans_up(tiny_llama):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randrange(2, 40))] for _ in range(8)]
    with Engine(str(tiny_llama), page_size=4) as inline:
        expected = [o.token_ids for o in inline.generate(input_ids=prompts, sampling_params=GREEDY)]
    engine = Engine(str(tiny_llama), page_size=4, worker_process=True, num_threads=1)
    try:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o.token_ids for o in outs] == expected
        streamed = "".join(c.text for c in engine.generate_stream(input_ids=prompts[0], sampling_params=GREEDY))
        assert streamed == outs[0].text
        stats = engine.stats()
        assert stats.num_finished == 9 and stats.used_pages == 0 and stats.protected_pages == 0
        assert engine.flush_cache() is True
        os.kill(engine.worker.process.pid, signal.SIGKILL)
        with pytest.raises((EngineDeadError, ValueError)):
            engine.generate(input_ids=prompts[0], sampling_params=GREEDY)
    finally:
        engine.shutdown()
    assert not engine.worker.process.is_alive()
    assert not engine.worker.ipc_dir.exists()
