"""The front end's link to the worker process: sockets, routing, supervision.

`WorkerLink` binds the two ZMQ sockets in a private directory, spawns the worker and waits
for its `WorkerReady` handshake. One task reads the worker's socket and routes each
`ReqOutput` to the `asyncio.Queue` registered for its request id; control replies (stats,
flush) go to the one caller waiting for them. A second task watches the worker process: when
it dies, every registered queue receives `WorkerUnavailable`, the link reports unhealthy, and
the worker is restarted with backoff (or `on_fatal` is called).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from radixrt import ipc
from radixrt.config import EngineConfig
from radixrt.frontend.errors import RequestError, WorkerUnavailable
from radixrt.worker.process import from_worker_addr, make_ipc_dir, spawn_worker, to_worker_addr

log = logging.getLogger(__name__)


class WorkerLink:
    def __init__(
        self, config: EngineConfig, restart: bool = True, on_fatal: Callable[[], None] | None = None, metrics=None
    ) -> None:
        self.config = config
        self.restart = restart
        self.on_fatal = on_fatal
        self.metrics = metrics
        self.streams: dict[str, asyncio.Queue] = {}  # request id -> its outputs
        self.info: ipc.WorkerReady | None = None  # the current worker's handshake
        self.process = None
        self.restarts = 0
        self.unhealthy_reason: str | None = "starting"
        self.last_output = 0.0  # time.monotonic() of the worker's latest step outputs
        self._control = asyncio.Lock()
        self._reply: asyncio.Future | None = None
        self._ready: asyncio.Future | None = None
        self._died = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task] = []

    @property
    def healthy(self) -> bool:
        return self.unhealthy_reason is None

    # ----- lifecycle -------------------------------------------------------------------------

    def bind(self) -> None:
        self.ipc_dir = make_ipc_dir()
        # Sends never wait (NOBLOCK into an unbounded queue), so the PUSH socket is a plain one:
        # aborts go out synchronously even from a cancelled task. Only the reader awaits.
        self._zmq = zmq.asyncio.Context()
        self._push = ipc.configure_socket(zmq.Context.instance().socket(zmq.PUSH))
        self._pull = ipc.configure_socket(self._zmq.socket(zmq.PULL))
        self._push.bind(to_worker_addr(self.ipc_dir))
        self._pull.bind(from_worker_addr(self.ipc_dir))
        self._tasks.append(asyncio.create_task(self._read_loop(), name="radixrt-reader"))

    async def start(self, model_dir) -> None:
        """Spawn the worker and return once it is ready; then watch it."""
        self.model_dir = model_dir
        await self._launch()
        self._tasks.append(asyncio.create_task(self._supervise(), name="radixrt-supervisor"))

    async def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to stop, wait for it (kill it past `timeout`), remove the socket dir."""
        self._closing = True
        for task in self._tasks:  # the supervisor may be mid-restart: stop it first
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        proc = self.process
        if proc is not None and proc.is_alive():
            if self.healthy:  # a worker still loading is not connected yet: nothing to wait for
                self.send(ipc.ShutdownReq(), required=False)
                await asyncio.to_thread(proc.join, timeout)
                if proc.is_alive():
                    log.warning("worker did not stop in %.0f s; killing it", timeout)
            if proc.is_alive():
                proc.kill()  # it ignores SIGTERM (the front end drives its shutdown)
                await asyncio.to_thread(proc.join, 5)
        if hasattr(self, "_push"):
            self._push.close()
            self._pull.close()
            self._zmq.term()
            shutil.rmtree(self.ipc_dir, ignore_errors=True)

    async def _launch(self) -> None:
        """Spawn a worker and wait for its handshake; raise RuntimeError if it fails to start."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._died = asyncio.Event()
        proc = spawn_worker(self.config, self.model_dir, self.ipc_dir)
        self.process = proc
        loop.add_reader(proc.sentinel, self._died.set)
        died = asyncio.create_task(self._died.wait())
        try:
            await asyncio.wait([self._ready, died], return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        info = self._ready.result() if self._ready.done() else None
        if info is None or info.error:
            loop.remove_reader(proc.sentinel)
            await asyncio.to_thread(proc.join, 10)
            reason = info.error if info else f"exit code {proc.exitcode}"
            raise RuntimeError(f"the worker process failed to start: {reason}")
        self.info = info
        self.unhealthy_reason = None
        if self.metrics:
            self.metrics.set_worker_up(True)
        log.info("worker %d ready: context %d, %d KV pages", info.pid, info.max_context, info.total_pages)

    async def _supervise(self) -> None:
        """Wait for the worker to die; fail its requests; restart it (with backoff) or give up."""
        while True:
            await self._died.wait()
            proc = self.process
            asyncio.get_running_loop().remove_reader(proc.sentinel)
            proc.join(1)
            if self._closing:
                return
            self._on_death(f"the worker process died (exit code {proc.exitcode})")
            if not self.restart:
                log.error("worker died and --no-restart-worker is set: stopping the server")
                if self.on_fatal:
                    self.on_fatal()
                return
            delay = 0.5
            while not self._closing:
                try:
                    await self._launch()
                    self.restarts += 1
                    if self.metrics:
                        self.metrics.worker_restarted()
                    break
                except RuntimeError as exc:
                    log.error("%s; retrying in %.1f s", exc, delay)
                    self.unhealthy_reason = str(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)

    def _on_death(self, reason: str) -> None:
        log.error("%s; failing %d request(s) in flight", reason, len(self.streams))
        self.unhealthy_reason = reason
        if self.metrics:
            self.metrics.set_worker_up(False)
        self.fail_requests(WorkerUnavailable(f"{reason} while this request was running"))
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(WorkerUnavailable(reason))

    def fail_requests(self, error: RequestError) -> int:
        """End every request in flight with `error` (each stream raises it); return how many."""
        for q in self.streams.values():
            q.put_nowait(error)
        return len(self.streams)

    # ----- messages --------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Route every message from the worker: outputs to their request queues, replies to callers."""
        while True:
            data = await self._pull.recv()
            try:
                msg = ipc.decode_from_worker(data)
            except msgspec.DecodeError as exc:
                log.error("dropped a malformed message from the worker: %s", exc)
                continue
            if isinstance(msg, ipc.StepOutputs):
                self.last_output = time.monotonic()
                for out in msg.outputs:
                    q = self.streams.get(out.rid)
                    if q is not None:
                        q.put_nowait(out)
            elif isinstance(msg, ipc.WorkerReady):
                if self._ready is not None and not self._ready.done() and msg.pid == self.process.pid:
                    self._ready.set_result(msg)
            elif self._reply is not None and not self._reply.done():
                self._reply.set_result(msg)

    def send(self, msg: ipc.ToWorker, required: bool = True) -> None:
        """Queue a message for the worker without waiting; a request needs a live worker."""
        if required and not self.healthy:
            raise WorkerUnavailable(f"the worker is not ready ({self.unhealthy_reason}); retry shortly")
        try:
            data = ipc.encode(msg)
        except (OverflowError, msgspec.EncodeError) as exc:
            raise RequestError(f"a parameter value is out of range: {exc}") from None
        try:
            self._push.send(data, flags=zmq.NOBLOCK)
        except zmq.Again:
            if required:
                raise WorkerUnavailable() from None

    async def call(self, msg: ipc.ToWorker, timeout: float = 30.0):
        """A control call (stats, flush): one at a time, so the next reply is ours."""
        async with self._control:
            self._reply = asyncio.get_running_loop().create_future()
            try:
                self.send(msg)
                return await asyncio.wait_for(self._reply, timeout)
            except asyncio.TimeoutError:
                raise WorkerUnavailable("the worker did not answer in time") from None
            finally:
                self._reply = None
