"""A tensor-parallel rank other than 0, in its own process: `python -m radixrt.runner.rank_process '<spec>'`.

Rank 0 (runner/tensor_parallel.py) starts it with a JSON spec: rank, size, the store's path, the
checkpoint folder, the rank's EngineConfig, its thread count. It loads its slice of the model,
says so in the store, joins the group, then runs every batch rank 0 broadcasts until told to stop.
It holds no scheduler and no allocator: page ids arrive in the batch.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from radixrt.config import EngineConfig
from radixrt.model.parallel import TensorParallel
from radixrt.runner.batch_broadcast import receive_batch
from radixrt.runner.model_runner import ModelRunner
from radixrt.runner.tensor_parallel import RANK_IDLE_TIMEOUT, init_group

log = logging.getLogger(__name__)


def leave_with_parent(poll_s: float = 0.5) -> None:
    """Exit when the process that started us is gone (killed, crashed): a rank must not outlive rank 0."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="radixrt-parent-watch", daemon=True).start()


def main(spec: dict) -> int:
    rank, size = spec["rank"], spec["size"]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the group stops
    logging.basicConfig(
        level=spec["log_level"],
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s rank {rank}[%(process)d] %(name)s: %(message)s",
    )
    leave_with_parent()
    torch.set_num_threads(spec["threads"])
    store = dist.FileStore(spec["store"], size)
    runner = ModelRunner(EngineConfig(**spec["config"]), spec["model_dir"], TensorParallel(rank, size))
    store.set(f"loaded/{rank}", "1")
    init_group(store, rank, size, runner.device, RANK_IDLE_TIMEOUT)
    try:
        while (batch := receive_batch(runner.device)) is not None:
            runner.forward(batch)
    except RuntimeError as exc:  # rank 0 went away, or a peer did
        log.error("leaving the tensor-parallel group: %s", exc)
        return 1
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
