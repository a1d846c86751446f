"""Tensor parallelism, the process side: rank 0 is the worker's runner, ranks 1..tp-1 are processes it starts.

    worker process: Worker + TensorParallelRunner (rank 0)      rank process r  (rank_process.py)
      scheduler, radix cache, page allocator, sampling            a ModelRunner on its slice, no allocator
      forward(batch):
        send_batch ─────────── dist.broadcast ─────────────────►  batch = receive_batch()
        its slice of the model ◄─ all-reduce x (1 + 2 per layer) ►  runner.forward(batch)
        logits ◄────────────── dist.gather ─────────────────────  its vocabulary columns
      close(): send_shutdown ─────────────────────────────────►  exits

Rank processes are fresh interpreters (`python -m radixrt.runner.rank_process`, never a fork of
this torch-laden process); the group meets through a `FileStore` in a private (0700) directory and
runs gloo on the CPU (loopback only) or NCCL on CUDA (device cuda:rank). Each rank gets an equal
share of the torch threads (`--num-threads`, else torch's default, divided by tp).

A dead rank takes the group down, loudly: rank 0 checks its children before each step, and a
collective with a dead peer fails at once (its socket closes) or after COLLECTIVE_TIMEOUT; either
way `forward` raises RankFailure naming the rank, and every later call raises it again. The worker
process then exits non-zero and the front end's watchdog restarts worker and ranks together; the
in-process Engine reports the error to its callers. Ranks leave when rank 0's process goes away.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from radixrt.attention.base import ForwardBatch
from radixrt.config import EngineConfig
from radixrt.model.loader import read_model_config
from radixrt.model.parallel import ShardLayout, TensorParallel
from radixrt.runner.batch_broadcast import send_batch, send_shutdown
from radixrt.runner.model_runner import ModelRunner

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # rank 0: a collective still waiting for a rank after this fails
RANK_IDLE_TIMEOUT = timedelta(days=365)  # ranks > 0 wait for rank 0's next step however long the server idles
STARTUP_TIMEOUT_S = 600.0  # for every rank to load its slice
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding radixrt/


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or stopped answering: the group cannot compute any more steps."""


def make_runner(config: EngineConfig, model_dir: str | os.PathLike) -> ModelRunner:
    """The worker's runner: one process, or rank 0 of a tensor-parallel group of `config.tp_size`."""
    return TensorParallelRunner(config, model_dir) if config.tp_size > 1 else ModelRunner(config, model_dir)


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """A rank's config: its own CUDA device; the eager forward (the fused CPU decoder has no collectives)."""
    device = f"cuda:{rank}" if torch.device(config.device).type == "cuda" else config.device
    return dataclasses.replace(config, device=device, disable_fused_decoder=True)


def init_group(store: dist.Store, rank: int, size: int, device: str, timeout: timedelta) -> None:
    """Join the group: NCCL on CUDA, gloo (on the loopback interface only) elsewhere."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
        backend = "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)


def _loopback_interface() -> str:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS): the group is reachable from this host only."""
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), "lo")


class RankProcesses:
    """Ranks 1..size-1 as child processes, and the store the group meets in."""

    def __init__(self, config: EngineConfig, model_dir: str | os.PathLike, threads: int) -> None:
        size = config.tp_size
        self.dir = Path(tempfile.mkdtemp(prefix="radixrt-tp-"))  # mode 0700: only this user reaches the store
        self.store = dist.FileStore(str(self.dir / "store"), size)
        path = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path}
        self.procs: list[subprocess.Popen] = []
        try:
            for rank in range(1, size):
                spec = {"rank": rank, "size": size, "store": str(self.dir / "store"), "model_dir": str(model_dir),
                        "config": dataclasses.asdict(rank_config(config, rank)), "threads": threads,
                        "log_level": logging.getLogger().getEffectiveLevel()}  # fmt: skip
                command = [sys.executable, "-m", "radixrt.runner.rank_process", json.dumps(spec)]
                # Its own session: a Ctrl-C in the terminal reaches the front end, which decides.
                self.procs.append(subprocess.Popen(command, env=env, start_new_session=True))
        except BaseException:
            self.stop()
            raise
        log.info("tensor parallel: started ranks 1..%d (pids %s)", size - 1, ", ".join(str(p.pid) for p in self.procs))

    def wait_loaded(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Return once every rank has loaded its slice; RankFailure if one exits first or time runs out."""
        keys = [f"loaded/{rank}" for rank in range(1, len(self.procs) + 1)]
        deadline = time.monotonic() + timeout
        while not self.store.check(keys):
            self.check_alive("while loading")
            if time.monotonic() > deadline:
                raise RankFailure(f"tensor-parallel ranks did not load the model in {timeout:.0f} s")
            time.sleep(0.05)

    def check_alive(self, when: str = "") -> None:
        for rank, proc in enumerate(self.procs, start=1):
            if proc.poll() is not None:
                raise RankFailure(_describe_exit(rank, proc, when))

    def failure(self, exc: BaseException) -> RankFailure:
        """Why a collective failed: the rank that died (given a moment to be reaped), else the error itself."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for rank, proc in enumerate(self.procs, start=1):
                if proc.poll() is not None:
                    return RankFailure(_describe_exit(rank, proc, "during a step"))
            time.sleep(0.02)
        return RankFailure(f"a tensor-parallel step failed: {exc}")

    def stop(self, wait_s: float = 0.0) -> None:
        """Let the ranks exit (after a shutdown message) for up to `wait_s`, then kill what is left."""
        deadline = time.monotonic() + wait_s
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _describe_exit(rank: int, proc: subprocess.Popen, when: str) -> str:
    code = proc.returncode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    return f"tensor-parallel rank {rank} (pid {proc.pid}) {how} {when}".rstrip()


class TensorParallelRunner(ModelRunner):
    """Rank 0: the worker's runner. Starts the other ranks, and sends each step's batch before computing its share."""

    def __init__(self, config: EngineConfig, model_dir: str | os.PathLike) -> None:
        size = config.tp_size
        ShardLayout.of(read_model_config(model_dir), 0, size)  # a model that does not split fails before any process
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialized in this process; run the tensor-parallel engine in "
                "its own process (Engine(..., worker_process=True))"
            )
        threads = max(1, torch.get_num_threads() // size)
        torch.set_num_threads(threads)
        self.ranks = RankProcesses(config, model_dir, threads)
        self.failed: RankFailure | None = None
        try:
            super().__init__(rank_config(config, 0), model_dir, TensorParallel(0, size))
            self.ranks.wait_loaded()
            init_group(self.ranks.store, 0, size, self.device, COLLECTIVE_TIMEOUT)
        except BaseException:
            self.ranks.stop()
            raise
        log.info("tensor parallel: %d ranks of %d threads, eager forward (the fused decoder has no collectives)",
                 size, threads)  # fmt: skip

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        if self.failed is not None:
            raise self.failed
        try:
            self.ranks.check_alive("before a step")
            send_batch(batch, self.device)
            return super().forward(batch)
        except RankFailure as exc:
            self.failed = exc
            raise
        except RuntimeError as exc:  # gloo's and NCCL's errors (a dead peer, a timeout) are RuntimeErrors
            self.failed = self.ranks.failure(exc)
            raise self.failed from exc

    def close(self) -> None:
        """Stop the ranks (politely while the group is healthy) and leave the group."""
        healthy = self.failed is None
        if healthy:
            try:
                send_shutdown(self.device)
            except RuntimeError:  # a rank died since the last step
                healthy = False
        self.ranks.stop(wait_s=10.0 if healthy else 0.0)
        if dist.is_initialized():
            dist.destroy_process_group()
