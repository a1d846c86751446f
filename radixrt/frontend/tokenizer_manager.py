"""The front end's request side: text in, token ids to the worker, Deltas out.

`TokenizerManager.generate(ids, params)` sends a `GenerateReq` and yields `Delta`s (new text,
token ids, logprobs) as the worker's outputs arrive on the request's queue (the `WorkerLink`
routes them; `OutputStream` turns them into Deltas, as it does for the offline Engine).
Closing a `generate` stream before it finished (a client went away, a stop string matched)
sends an `AbortReq`, so the worker frees the request's pages at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

from radixrt import ipc
from radixrt.config import EngineConfig
from radixrt.frontend.errors import RequestError, WorkerUnavailable
from radixrt.frontend.output import Delta, OutputStream
from radixrt.frontend.worker_link import WorkerLink
from radixrt.model.loader import load_tokenizer, resolve_model_path
from radixrt.request import prompt_error
from radixrt.sampling_params import SamplingParams

__all__ = ["Delta", "RequestError", "TokenizerManager", "WorkerUnavailable"]

class TokenizerManager:
    def __init__(
        self,
        config: EngineConfig,
        restart_worker: bool = True,
        on_fatal: Callable[[], None] | None = None,
        metrics=None,
    ) -> None:
        self.config = config
        self.metrics = metrics  # a radixrt.server.metrics.ServerMetrics, or None
        self.link = WorkerLink(config, restart_worker, on_fatal, metrics)
        self.tokenizer = None
        self.model_dir = None

    async def start(self) -> None:
        """Load the tokenizer while the worker loads the model; return once both are ready."""
        self.model_dir = await asyncio.to_thread(resolve_model_path, self.config.model)
        self.link.bind()
        launch = asyncio.create_task(self.link.start(self.model_dir))
        try:
            self.tokenizer = await asyncio.to_thread(load_tokenizer, self.model_dir)
            await launch
        finally:
            launch.cancel()  # no-op once it finished; stops it if the tokenizer failed

    async def close(self, timeout: float = 10.0) -> None:
        await self.link.close(timeout)

    @property
    def healthy(self) -> bool:
        return self.link.healthy

    @property
    def unhealthy_reason(self) -> str | None:
        return self.link.unhealthy_reason

    @property
    def max_context(self) -> int:
        return self.link.info.max_context if self.link.info else 0

    @property
    def vocab_size(self) -> int:
        return self.link.info.vocab_size if self.link.info else 0

    @property
    def worker_pid(self) -> int | None:
        return self.link.process.pid if self.link.process is not None else None

    @property
    def restarts(self) -> int:
        return self.link.restarts

    # ----- requests --------------------------------------------------------------------------

    def encode(self, text: str, param: str = "prompt") -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.check_ids(ids, param)

    def check_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        """Reject prompts the worker could not run: empty, unknown token ids, longer than the context."""
        error = prompt_error(ids, self.vocab_size, self.max_context)
        if error:
            raise RequestError(error, param=param)
        return ids

    async def generate(self, ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Run one request; yield its Deltas. Closing the iterator early aborts it in the worker."""
        rid = uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self.link.streams[rid] = q
        stream = OutputStream(self.tokenizer, params)
        try:
            self.link.send(ipc.GenerateReq(rid, ids, params))
        except RequestError:
            self.link.streams.pop(rid, None)
            raise
        start = last = time.monotonic()
        done = False
        try:
            while not done:
                item = await q.get()
                if isinstance(item, RequestError):  # the worker died under this request
                    done = True
                    raise item
                try:
                    delta = stream.add(item)
                except RequestError:  # the worker refused the request
                    done = True
                    raise
                if item.new_token_ids and self.metrics:
                    now = time.monotonic()
                    (self.metrics.ttft if last == start else self.metrics.itl).observe(now - last)
                    last = now
                if delta is None:
                    continue
                if delta.finished:
                    done = True
                    if stream.ends_in_front_end:
                        self.link.send(ipc.AbortReq(rid, "stop"), required=False)
                    if self.metrics:
                        self.metrics.observe_finished(delta, time.monotonic() - start)
                yield delta
        except RequestError:
            if self.metrics:
                self.metrics.requests.labels("error").inc()
            raise
        finally:
            self.link.streams.pop(rid, None)
            if not done:
                self.link.send(ipc.AbortReq(rid), required=False)
                if self.metrics:
                    self.metrics.requests.labels("abort").inc()

    async def stats(self) -> ipc.EngineStats:
        return await self.link.call(ipc.StatsReq())

    async def flush_cache(self) -> bool:
        return (await self.link.call(ipc.FlushCacheReq())).ok

