"""The front end's request side: text in, token ids to the worker, Deltas out.

`TokenizerManager.generate(ids, params)` sends a `GenerateReq` and yields `Delta`s (new text,
token ids, logprobs) as the worker's outputs arrive on the request's queue (the `WorkerLink`
routes them; `OutputStream` turns them into Deltas, as it does for the offline Engine).
Closing a `generate` stream before it finished (a client went away, a stop string matched)
sends an `AbortReq`, so the worker frees the request's pages at once.

`encode` and `chat_ids` are plain functions of the text: the server decides where they run
(inline for small inputs, on its preparation threads otherwise). They refuse, before any work,
text longer than any prompt that could fit the context (`max_prompt_chars`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

from radixrt import ipc
from radixrt.config import EngineConfig
from radixrt.frontend.chat_template import render_chat
from radixrt.frontend.errors import RequestError, WorkerUnavailable
from radixrt.frontend.output import Delta, OutputStream
from radixrt.frontend.stop_strings import StopStrings
from radixrt.frontend.worker_link import WorkerLink
from radixrt.model.loader import load_tokenizer, resolve_model_path
from radixrt.request import prompt_error
from radixrt.sampling_params import SamplingParams

__all__ = ["Delta", "RequestError", "TokenizerManager", "WorkerUnavailable"]

# A token covers at most its longest vocabulary entry's characters of the input; normalizers
# (NFC, NFKC) can shrink text a little first: twice that many characters cannot fit.
PROMPT_CHARS_SLACK = 2


class TokenizerManager:
    def __init__(
        self,
        config: EngineConfig,
        restart_worker: bool = True,
        on_fatal: Callable[[], None] | None = None,
        metrics=None,
        max_prompt_chars: int | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics  # a radixrt.server.metrics.ServerMetrics, or None
        self.link = WorkerLink(config, restart_worker, on_fatal, metrics)
        self.tokenizer = None
        self.model_dir = None
        self._max_prompt_chars = max_prompt_chars  # None: from the context and the vocabulary
        self._longest_token = 0  # characters of the longest vocabulary entry

    async def start(self) -> None:
        """Load the tokenizer while the worker loads the model; return once both are ready."""
        self.model_dir = await asyncio.to_thread(resolve_model_path, self.config.model)
        self.link.bind()
        launch = asyncio.create_task(self.link.start(self.model_dir))
        try:
            self.tokenizer = await asyncio.to_thread(load_tokenizer, self.model_dir)
            self._longest_token = await asyncio.to_thread(lambda: max(map(len, self.tokenizer.get_vocab())))
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
    def max_prompt_chars(self) -> int:
        """Prompt text longer than this is refused before tokenizing: it could not fit the context."""
        if self._max_prompt_chars is not None:
            return self._max_prompt_chars
        return PROMPT_CHARS_SLACK * self.max_context * self._longest_token

    @property
    def worker_pid(self) -> int | None:
        return self.link.process.pid if self.link.process is not None else None

    @property
    def restarts(self) -> int:
        return self.link.restarts

    # ----- requests --------------------------------------------------------------------------

    def tokenize(self, text: str, param: str = "prompt", add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; a 400 naming `param`, before any work, when it is longer than any
        prompt that fits the context."""
        if len(text) > self.max_prompt_chars:
            raise RequestError(
                f"{param}: {len(text):,} characters is more than any prompt that fits this model's context "
                f"of {self.max_context:,} tokens (at most {self.max_prompt_chars:,} characters are tokenized)",
                param=param,
            )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode(self, text: str, param: str = "prompt") -> list[int]:
        """Token ids of a prompt the worker can run (`check_ids`)."""
        return self.check_ids(self.tokenize(text, param), param)

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """Chat messages as the model's template writes them; errors are 400s naming `messages`."""
        try:
            return render_chat(self.tokenizer, messages, add_generation_prompt, tools)
        except ValueError as exc:
            raise RequestError(str(exc), 400, "messages") from None
        except Exception as exc:  # a Jinja error raised by the model's own template
            raise RequestError(f"the chat template rejected these messages: {exc}", 400, "messages") from None

    def chat_ids(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, tools), "messages")

    def check_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        """Reject prompts the worker could not run: empty, unknown token ids, longer than the context."""
        if len(ids) >= self.max_context:  # refused before scanning the ids, however many there are
            raise RequestError(
                f"the prompt has {len(ids):,} tokens; this model's context holds at most {self.max_context - 1:,}",
                param=param,
            )
        error = prompt_error(ids, self.vocab_size, self.max_context)
        if error:
            raise RequestError(error, param=param)
        return ids

    def fail_all(self, error: RequestError) -> int:
        """End every request in flight with `error` (their streams raise it, the worker aborts them);
        return how many there were."""
        return self.link.fail_requests(error)

    async def generate(
        self, ids: list[int], params: SamplingParams, stops: StopStrings | None = None
    ) -> AsyncIterator[Delta]:
        """Run one request; yield its Deltas. Closing the iterator early aborts it in the worker.
        `stops`: `params.stop` already built, when the caller built it off the event loop."""
        rid = uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self.link.streams[rid] = q
        stream = OutputStream(self.tokenizer, params, stops)
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
                if isinstance(item, RequestError):  # the worker died, or the server is cutting requests short
                    done = True
                    if self.healthy:  # the worker still holds this request: free its pages
                        self.link.send(ipc.AbortReq(rid), required=False)
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

