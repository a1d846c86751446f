"""The front end's request side: text in, token ids to the worker, text and logprobs out.

`TokenizerManager.generate(ids, params)` sends a `GenerateReq` and yields `Delta`s (new text,
token ids, logprobs) as the worker's outputs arrive on the request's queue (the `WorkerLink`
routes them). Text, stop strings and timing live here; the worker only ever sees token ids.
Closing a `generate` stream before it finished (a client went away, a stop string matched)
sends an `AbortReq`, so the worker frees the request's pages at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from radixrt import ipc
from radixrt.config import EngineConfig
from radixrt.frontend.detokenizer import IncrementalDetokenizer
from radixrt.frontend.worker_link import RequestError, WorkerLink, WorkerUnavailable
from radixrt.model.loader import load_tokenizer, resolve_model_path
from radixrt.sampling_params import SamplingParams

__all__ = ["Delta", "RequestError", "TokenizerManager", "WorkerUnavailable"]

TopLogprobs = list[tuple[int, float]]


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
        self.link.streams[rid] = q
        detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens)
        try:
            self.link.send(ipc.GenerateReq(rid, ids, params))
        except RequestError:
            self.link.streams.pop(rid, None)
            raise
        start = last = time.monotonic()
        done = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, RequestError) or item.error:  # the worker died, or refused the request
                    done = True
                    if self.metrics:
                        self.metrics.requests.labels("error").inc()
                    raise item if isinstance(item, RequestError) else RequestError(item.error)
                out: ipc.ReqOutput = item
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
                    self.link.send(ipc.AbortReq(rid, "stop"), required=False)
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
            self.link.streams.pop(rid, None)
            if not done:
                self.link.send(ipc.AbortReq(rid), required=False)
                if self.metrics:
                    self.metrics.requests.labels("abort").inc()

    async def stats(self) -> ipc.EngineStats:
        return await self.link.call(ipc.StatsReq())

    async def flush_cache(self) -> bool:
        return (await self.link.call(ipc.FlushCacheReq())).ok


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
