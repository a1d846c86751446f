"""The worker in its own process, linked to the front end by two ZMQ sockets.

    front end (binds)                              worker process (connects)
      PUSH  ipc://<dir>/to_worker   ──────────►   PULL   GenerateReq, AbortReq, StatsReq, ...
      PULL  ipc://<dir>/from_worker ◄──────────   PUSH   WorkerReady once, then StepOutputs,
                                                         EngineStats, FlushCacheResult

`<dir>` is a private temporary directory (mode 0700) the front end creates, so only its
user can reach the sockets. Every message is a typed msgspec struct from `radixrt.ipc`,
encoded as msgpack: nothing is pickled. The front end binds, so a restarted worker simply
connects to the same addresses.

With `--tp N` the worker is rank 0 of a tensor-parallel group and starts the other N - 1 ranks
itself (runner/tensor_parallel.py); when one dies, the worker exits non-zero naming it, and the
front end's watchdog restarts the whole group.

The loop is the offline Engine's `_loop` with sockets instead of a queue: drain incoming
messages (without waiting while there is work, with a bounded poll while idle), run one
step, push what every request gained as one `StepOutputs` message.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import zmq

from radixrt import ipc
from radixrt.config import EngineConfig
from radixrt.model.loader import read_model_config, resolve_model_path
from radixrt.runner.tensor_parallel import RankFailure
from radixrt.worker.worker import Worker

log = logging.getLogger(__name__)

IDLE_POLL_MS = 500  # while idle, wake this often to notice that the front end is gone


def make_ipc_dir() -> Path:
    """A fresh private directory for the two socket files (mkdtemp creates it 0700)."""
    path = Path(tempfile.mkdtemp(prefix="radixrt-ipc-"))
    os.chmod(path, 0o700)
    return path


def to_worker_addr(ipc_dir: str | os.PathLike) -> str:
    return f"ipc://{Path(ipc_dir) / 'to_worker'}"


def from_worker_addr(ipc_dir: str | os.PathLike) -> str:
    return f"ipc://{Path(ipc_dir) / 'from_worker'}"


def spawn_worker(config: EngineConfig, model_dir: str | os.PathLike, ipc_dir: str | os.PathLike):
    """Start `run_worker` in a fresh interpreter (spawn: no forked torch or event-loop state)."""
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=run_worker,
        args=(dataclasses.asdict(config), str(model_dir), str(ipc_dir), logging.getLogger().getEffectiveLevel()),
        name="radixrt-worker",
        daemon=True,
    )
    proc.start()
    return proc


def run_worker(config: dict, model_dir: str, ipc_dir: str, log_level: int = logging.INFO) -> None:
    """The child process's entry point: load the model, say ready, serve until told to stop."""
    # The front end owns shutdown: a Ctrl-C or SIGTERM sent to the whole process group must
    # not kill the worker under requests the front end is still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level,  # the front end's level
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s worker[%(process)d] %(name)s: %(message)s",
    )
    parent = os.getppid()
    ctx = zmq.Context()
    pull = ipc.configure_socket(ctx.socket(zmq.PULL), linger_ms=1000)
    push = ipc.configure_socket(ctx.socket(zmq.PUSH), linger_ms=1000)
    pull.connect(to_worker_addr(ipc_dir))
    push.connect(from_worker_addr(ipc_dir))
    try:
        worker = Worker(EngineConfig(**config), model_dir=model_dir)
    except BaseException as exc:  # report why, then exit non-zero: the front end decides what to do
        log.exception("worker failed to start")
        push.send(ipc.encode(ipc.WorkerReady(pid=os.getpid(), error=f"{type(exc).__name__}: {exc}")))
        push.close()
        ctx.term()
        sys.exit(1)
    push.send(
        ipc.encode(
            ipc.WorkerReady(
                pid=os.getpid(),
                max_context=worker.max_context,
                vocab_size=worker.model_config.vocab_size,
                total_pages=worker.allocator.num_pages,
                page_size=worker.config.page_size,
                dtype=str(worker.runner.dtype).removeprefix("torch."),
            )
        )
    )
    orphaned = False
    try:
        orphaned = serve(worker, pull, push, parent)
    except RankFailure as exc:  # a tensor-parallel rank is gone: the group cannot compute another step
        log.error("%s; exiting, so that the front end restarts the worker with all its ranks", exc)
        sys.exit(1)
    finally:
        worker.close()
        pull.close(linger=0)
        push.close(linger=0 if orphaned else None)
        ctx.term()
    if orphaned:  # nobody else will remove the socket directory now
        shutil.rmtree(ipc_dir, ignore_errors=True)


def serve(worker, pull: zmq.Socket, push: zmq.Socket, parent: int) -> bool:
    """Drain messages, step, push outputs. Return False on ShutdownReq, True when the front end
    is gone (checked every iteration: a worker must not outlive the server that owns it)."""
    while True:
        timeout = 0 if worker.has_work() else IDLE_POLL_MS
        while pull.poll(timeout):
            timeout = 0
            try:
                msg = ipc.decode_to_worker(pull.recv())
            except msgspec.DecodeError as exc:  # only our front end can reach the socket; still, never crash on it
                log.error("dropped a malformed message: %s", exc)
                continue
            if isinstance(msg, ipc.ShutdownReq):
                log.info("shutting down")
                return False
            try:
                reply = worker.handle(msg)
            except Exception as exc:  # one bad request must not take the worker (and everyone's requests) down
                log.exception("failed to handle %s", type(msg).__name__)
                if not isinstance(msg, ipc.GenerateReq):
                    raise
                reply = ipc.StepOutputs([ipc.ReqOutput(msg.rid, [], True, "error", error=f"rejected: {exc}")])
            if reply is not None:
                push.send(ipc.encode(reply))
        if worker.has_work():
            outputs = worker.step()
            if outputs:
                push.send(ipc.encode(ipc.StepOutputs(outputs)))
        if os.getppid() != parent:
            log.warning("the front end is gone; exiting")
            return True


class WorkerProcessClient:
    """The Worker's interface (`handle`, `step`, `has_work`) over the sockets, for the offline
    Engine: `Engine(..., worker_process=True)` runs the model in a child process exactly as the
    server does, while the Engine's loop thread stays the same."""

    STEP_POLL_MS = 10  # step() waits this long for outputs before returning to the Engine's loop

    def __init__(self, config: EngineConfig, model_dir=None, startup_timeout: float = 600.0) -> None:
        self.model_dir = Path(model_dir or resolve_model_path(config.model))
        self.model_config = read_model_config(self.model_dir)
        self.ipc_dir = make_ipc_dir()
        self._ctx = zmq.Context()
        self._push = ipc.configure_socket(self._ctx.socket(zmq.PUSH))
        self._pull = ipc.configure_socket(self._ctx.socket(zmq.PULL))
        self._push.bind(to_worker_addr(self.ipc_dir))
        self._pull.bind(from_worker_addr(self.ipc_dir))
        self._outstanding: set[str] = set()
        self._buffered: list[ipc.ReqOutput] = []
        self.process = spawn_worker(config, self.model_dir, self.ipc_dir)
        ready = self._recv_reply(ipc.WorkerReady, startup_timeout)
        if ready.error:
            self.close()
            raise RuntimeError(f"the worker process failed to start: {ready.error}")
        self.max_context = ready.max_context

    def handle(self, msg: ipc.ToWorker) -> ipc.FromWorker | None:
        if isinstance(msg, ipc.GenerateReq):
            self._outstanding.add(msg.rid)
        self._push.send(ipc.encode(msg))
        if isinstance(msg, ipc.StatsReq):
            return self._recv_reply(ipc.EngineStats)
        if isinstance(msg, ipc.FlushCacheReq):
            return self._recv_reply(ipc.FlushCacheResult)
        return None

    def has_work(self) -> bool:
        return bool(self._outstanding or self._buffered)

    def step(self) -> list[ipc.ReqOutput]:
        if not self._buffered and self._pull.poll(self.STEP_POLL_MS):
            self._take(ipc.decode_from_worker(self._pull.recv()))
        while self._pull.poll(0):
            self._take(ipc.decode_from_worker(self._pull.recv()))
        out, self._buffered = self._buffered, []
        if not out and not self.process.is_alive():
            raise RuntimeError(f"the worker process died (exit code {self.process.exitcode})")
        return out

    def close(self, timeout: float = 10.0) -> None:
        if self.process.is_alive():
            self._push.send(ipc.encode(ipc.ShutdownReq()), flags=zmq.NOBLOCK)
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        self._push.close()
        self._pull.close()
        self._ctx.term()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def _take(self, msg: ipc.FromWorker):
        """Buffer step outputs (tracking which requests finished); hand anything else back."""
        if not isinstance(msg, ipc.StepOutputs):
            return msg
        for out in msg.outputs:
            if out.finished:
                self._outstanding.discard(out.rid)
        self._buffered.extend(msg.outputs)
        return None

    def _recv_reply(self, kind: type, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._pull.poll(100):
                reply = self._take(ipc.decode_from_worker(self._pull.recv()))
                if isinstance(reply, kind):
                    return reply
            elif not self.process.is_alive():
                raise RuntimeError(f"the worker process died (exit code {self.process.exitcode})")
        raise TimeoutError(f"no {kind.__name__} from the worker in {timeout:.0f} s")
