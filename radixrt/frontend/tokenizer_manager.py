"""The front end's side of the worker link: one async stream per request, worker supervision.

`TokenizerManager.generate(ids, params)` sends a `GenerateReq` and yields `Delta`s (new text,
token ids, logprobs) as the worker's `StepOutputs` arrive; one background task reads the
worker's socket and routes each `ReqOutput` to its request's `asyncio.Queue`. Text, stop
strings and timing live here; the worker only ever sees token ids.

Closing a `generate` stream before it finished (a client went away, a stop string matched)
sends an `AbortReq`, so the worker frees the request's pages. A second task watches the
worker process: when it dies, every request in flight ends with `WorkerUnavailable`, the
manager reports unhealthy, and the worker is restarted (or `on_fatal` is called).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio

from radixrt import ipc
from radixrt.config import EngineConfig
from radixrt.frontend.detokenizer import IncrementalDetokenizer
from radixrt.model.loader import load_tokenizer, resolve_model_path
from radixrt.sampling_params import SamplingParams
from radixrt.worker_process import from_worker_addr, make_ipc_dir, spawn_worker, to_worker_addr

log = logging.getLogger(__name__)

TopLogprobs = list[tuple[int, float]]


class RequestError(Exception):
    """A request the server refuses or cannot finish; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


class WorkerUnavailable(RequestError):
    def __init__(self, message: str = "the worker process is not running; retry shortly") -> None:
        super().__init__(message, status=503)


@dataclass
class Delta:
    """What one request gained since the previous Delta; the last one has `finished` set."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[TopLogprobs] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | ...
    matched_stop: int | str | None = None  # the stop token id or stop string that ended it
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs] | None = None


class TokenizerManager:
    def __init__(
        self,
        config: EngineConfig,
        restart_worker: bool = True,
        on_fatal: Callable[[], None] | None = None,
        metrics=None,
    ) -> None:
        self.config = config
        self.restart_worker = restart_worker
        self.on_fatal = on_fatal
        self.metrics = metrics  # a radixrt.server.metrics.ServerMetrics, or None
        self.tokenizer = None
        self.model_dir = None
        self.info: ipc.WorkerReady | None = None  # the current worker's handshake
        self.process = None
        self.restarts = 0
        self.unhealthy_reason: str | None = "starting"
        self._streams: dict[str, asyncio.Queue] = {}
        self._control = asyncio.Lock()
        self._reply: asyncio.Future | None = None
        self._ready: asyncio.Future | None = None
        self._died = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task] = []

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the tokenizer while the worker loads the model; return once it is ready."""
        self.model_dir = await asyncio.to_thread(resolve_model_path, self.config.model)
        self.ipc_dir = make_ipc_dir()
        # Sends never wait (NOBLOCK into an unbounded queue), so the PUSH socket is a plain one:
        # aborts go out synchronously even from a cancelled task. Only the reader awaits.
        self._zmq = zmq.asyncio.Context()
        self._push = zmq.Context.instance().socket(zmq.PUSH)
        self._pull = self._zmq.socket(zmq.PULL)
        for sock in (self._push, self._pull):
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
        self._push.bind(to_worker_addr(self.ipc_dir))
        self._pull.bind(from_worker_addr(self.ipc_dir))
        self._tasks.append(asyncio.create_task(self._read_loop(), name="radixrt-reader"))
        launch = asyncio.create_task(self._launch())
        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.model_dir)
        await launch
        self._tasks.append(asyncio.create_task(self._supervise(), name="radixrt-supervisor"))

    async def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to stop, wait for it (kill it past `timeout`), remove the socket dir."""
        self._closing = True
        proc = self.process
        if proc is not None and proc.is_alive():
            self._send(ipc.ShutdownReq(), required=False)
            await asyncio.to_thread(proc.join, timeout)
            if proc.is_alive():
                log.warning("worker did not stop in %.0f s; killing it", timeout)
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._push.close()
        self._pull.close()
        self._zmq.term()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    @property
    def healthy(self) -> bool:
        return self.unhealthy_reason is None

    @property
    def max_context(self) -> int:
        return self.info.max_context if self.info else 0

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size if self.info else 0

    async def _launch(self) -> None:
        """Spawn a worker and wait for its handshake; raise RuntimeError if it fails to start."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._died = asyncio.Event()
        proc = spawn_worker(self.config, self.model_dir, self.ipc_dir)
        self.process = proc
        loop.add_reader(proc.sentinel, self._died.set)
        died = asyncio.create_task(self._died.wait())
        await asyncio.wait([self._ready, died], return_when=asyncio.FIRST_COMPLETED)
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
            self.metrics.worker_up.set(1)
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
            self._on_worker_death(f"the worker process died (exit code {proc.exitcode})")
            if not self.restart_worker:
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
                        self.metrics.worker_restarts.inc()
                    break
                except RuntimeError as exc:
                    log.error("%s; retrying in %.1f s", exc, delay)
                    self.unhealthy_reason = str(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)

    def _on_worker_death(self, reason: str) -> None:
        log.error("%s; failing %d request(s) in flight", reason, len(self._streams))
        self.unhealthy_reason = reason
        if self.metrics:
            self.metrics.worker_up.set(0)
        for q in self._streams.values():
            q.put_nowait(WorkerUnavailable(f"{reason} while this request was running"))
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(WorkerUnavailable(reason))

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
                for out in msg.outputs:
                    q = self._streams.get(out.rid)
                    if q is not None:
                        q.put_nowait(out)
            elif isinstance(msg, ipc.WorkerReady):
                if self._ready is not None and not self._ready.done() and msg.pid == self.process.pid:
                    self._ready.set_result(msg)
            elif self._reply is not None and not self._reply.done():
                self._reply.set_result(msg)

    def _send(self, msg: ipc.ToWorker, required: bool = True) -> None:
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

    # ----- requests --------------------------------------------------------------------------

    def encode(self, text: str, param: str = "prompt") -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.check_ids(ids, param)

    def check_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        """Reject prompts the worker could not run: empty, unknown token ids, longer than the context."""
        if not ids:
            raise RequestError("the prompt is empty", param=param)
        if any(not isinstance(t, int) or t < 0 or t >= self.vocab_size for t in ids):
            raise RequestError(f"token ids must be integers in [0, {self.vocab_size})", param=param)
        if len(ids) >= self.max_context:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; this model's context holds at most {self.max_context - 1}",
                param=param,
            )
        return ids

    async def generate(self, ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Run one request; yield its Deltas. Closing the iterator early aborts it in the worker."""
        rid = uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = q
        detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens)
        try:
            self._send(ipc.GenerateReq(rid, ids, params))
        except RequestError:
            self._streams.pop(rid, None)
            raise
        start = last = time.monotonic()
        done = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, RequestError):
                    done = True
                    raise item
                out: ipc.ReqOutput = item
                if out.error:
                    done = True
                    raise RequestError(out.error)
                if out.new_token_ids and self.metrics:
                    now = time.monotonic()
                    (self.metrics.ttft if last == start else self.metrics.itl).observe(now - last)
                    last = now
                text = detok.add(out.new_token_ids)
                stop_matched = detok.stopped and not out.finished
                if not (out.finished or stop_matched):
                    if text or out.new_token_ids:
                        yield _delta(out, text)
                    continue
                text += detok.flush()
                done = True
                if stop_matched:
                    self._send(ipc.AbortReq(rid), required=False)
                delta = _delta(out, text)
                delta.finished = True
                delta.finish_reason = "stop" if detok.stopped else out.finish_reason
                delta.matched_stop = _matched_stop_string(detok) if detok.stopped else out.matched_stop
                delta.prompt_logprobs, delta.prompt_top_logprobs = out.prompt_logprobs, out.prompt_top_logprobs
                if self.metrics:
                    self.metrics.observe_finished(delta, time.monotonic() - start)
                yield delta
                return
        finally:
            self._streams.pop(rid, None)
            if not done:
                self._send(ipc.AbortReq(rid), required=False)
                if self.metrics:
                    self.metrics.requests.labels("abort").inc()

    async def _call(self, msg: ipc.ToWorker, timeout: float = 30.0):
        """A control call (stats, flush): one at a time, so the next reply is ours."""
        async with self._control:
            self._reply = asyncio.get_running_loop().create_future()
            try:
                self._send(msg)
                return await asyncio.wait_for(self._reply, timeout)
            except asyncio.TimeoutError:
                raise WorkerUnavailable("the worker did not answer in time") from None
            finally:
                self._reply = None

    async def stats(self) -> ipc.EngineStats:
        return await self._call(ipc.StatsReq())

    async def flush_cache(self) -> bool:
        return (await self._call(ipc.FlushCacheReq())).ok

    @property
    def worker_pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


def _delta(out: ipc.ReqOutput, text: str) -> Delta:
    return Delta(
        text=text,
        token_ids=out.new_token_ids,
        logprobs=out.logprobs,
        top_logprobs=out.top_logprobs,
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        cached_tokens=out.cached_tokens,
    )


def _matched_stop_string(detok: IncrementalDetokenizer) -> str | None:
    """Which stop string ended the text (the detokenizer cut the text right before it)."""
    tail = detok.tokenizer.decode(detok.token_ids, skip_special_tokens=detok.skip_special_tokens)[len(detok.text) :]
    return next((s for s in detok.stop if tail.startswith(s)), None)
