"""The front end's request side: text in, token ids to the worker, Deltas out.

`TokenizerManager.generate(ids, params)` sends a `GenerateReq` and yields `Delta`s (new text,
token ids, logprobs) as the worker's outputs arrive on the request's queue (the `WorkerLink`
routes them; `OutputStream` turns them into Deltas, as it does for the offline Engine).
Closing a `generate` stream before it finished (a client went away, a stop string matched)
sends an `AbortReq`, so the worker frees the request's pages at once.

`encode` and `chat_ids` are plain functions of the text: the server decides where they run
(inline for small inputs, on its preparation threads otherwise). They refuse, before any work,
text longer than any prompt that could fit the context (`max_prompt_chars`).

A request's id is the client's when it gave one (`rid`, `X-Request-Id`); the several streams of
one request (n choices, a batch) are `<id>-<k>` in a group under it, so `abort(id)` ends them all.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

from radixrt import ipc
from radixrt.config import EngineConfig
from radixrt.frontend.chat_template import load_chat_template, render_chat
from radixrt.frontend.detokenizer import StopRules
from radixrt.frontend.errors import RequestError, WorkerUnavailable
from radixrt.frontend.output import Delta, OutputStream
from radixrt.frontend.worker_link import WorkerLink
from radixrt.kv_budget import resolve_kv_budget
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
        self.groups: dict[str, set[str]] = {}  # a request's id -> the ids of its streams in flight
        self._max_prompt_chars = max_prompt_chars  # None: from the context and the vocabulary
        self._longest_token = 0  # characters of the longest vocabulary entry

    async def start(self) -> None:
        """Load the tokenizer while the worker loads the model; return once both are ready."""
        self.model_dir = await asyncio.to_thread(resolve_model_path, self.config.model)
        self.config = self.link.config = resolve_kv_budget(self.config, self.model_dir)
        template = load_chat_template(self.config.chat_template) if self.config.chat_template else None
        self.link.bind()
        launch = asyncio.create_task(self.link.start(self.model_dir))
        try:
            self.tokenizer = await asyncio.to_thread(load_tokenizer, self.model_dir)
            if template is not None:
                self.tokenizer.chat_template = template
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

    def encode(self, text: str, param: str = "prompt", add_special_tokens: bool = False) -> list[int]:
        """Token ids of a prompt the worker can run (`check_ids`)."""
        return self.check_ids(self.tokenize(text, param, add_special_tokens), param)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools=None, **options) -> str:
        """Chat messages as the model's template writes them (`options`: render_chat's
        continue_final_message, template_kwargs); errors are 400s naming `messages`."""
        try:
            return render_chat(self.tokenizer, messages, add_generation_prompt, tools, **options)
        except ValueError as exc:
            param = "chat_template_kwargs" if "chat_template_kwargs" in str(exc) else "messages"
            raise RequestError(str(exc), 400, param) from None
        except Exception as exc:  # a Jinja error raised by the model's own template
            raise RequestError(f"the chat template rejected these messages: {exc}", 400, "messages") from None

    def chat_ids(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        add_special_tokens: bool = False,
        **options,
    ) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, tools, **options)
        return self.encode(text, "messages", add_special_tokens)

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

    def check_rids_free(self, rids: list[str], param: str) -> None:
        """A 400 naming `param` when a request id is already in flight (ids must be unique to abort by)."""
        taken = [r for r in rids if r in self.link.streams or r in self.groups]
        if taken:
            raise RequestError(f"{param}: request id {taken[0]!r} is already in use by a running request", 400, param)

    def abort(self, rid: str | None = None) -> int:
        """End the request `rid` (every stream of it), or every request when None, as an abort
        (finish_reason "abort", the text so far kept); return how many streams were told."""
        targets = set(self.link.streams) if rid is None else self.groups.get(rid, set()) | {rid}
        targets &= set(self.link.streams)
        for r in targets:
            self.link.send(ipc.AbortReq(r), required=False)
        return len(targets)

    async def generate(
        self,
        ids: list[int],
        params: SamplingParams,
        stops: StopRules | None = None,
        rid: str | None = None,
        group: str | None = None,
    ) -> AsyncIterator[Delta]:
        """Run one request; yield its Deltas. Closing the iterator early aborts it in the worker.
        `stops`: the params' stop rules already built, when the caller built them off the event loop.
        `rid`: the stream's id (a fresh one when None); `group`: the request it belongs to."""
        rid = rid or uuid.uuid4().hex
        self.check_rids_free([rid], "rid")  # checked again here: two requests may have raced past the first check
        q: asyncio.Queue = asyncio.Queue()
        stream = OutputStream(self.tokenizer, params, stops)
        self.link.streams[rid] = q
        if group is not None:
            self.groups.setdefault(group, set()).add(rid)
        try:
            self.link.send(ipc.GenerateReq(rid, ids, params))
        except RequestError:
            self._forget(rid, group)
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
                except RequestError:  # the worker refused the request, or a stop regex failed to match in time
                    done = True
                    if not item.finished:
                        self.link.send(ipc.AbortReq(rid), required=False)
                    raise
                if item.new_token_ids and self.metrics:
                    now = time.monotonic()
                    self.metrics.observe_tokens(now - last, len(item.new_token_ids), first=last == start)
                    last = now
                if delta is None:
                    continue
                if delta.finished:
                    done = True
                    if stream.ends_in_front_end:
                        self.link.send(ipc.AbortReq(rid, "stop"), required=False)
                    if self.metrics:
                        self.metrics.observe_finished(delta, time.monotonic() - start, params.grammar_spec is not None)
                yield delta
        except RequestError:
            if self.metrics:
                self.metrics.observe_ended("error")
            raise
        finally:
            self._forget(rid, group)
            if not done:
                self.link.send(ipc.AbortReq(rid), required=False)
                if self.metrics:
                    self.metrics.observe_ended("abort")

    def _forget(self, rid: str, group: str | None) -> None:
        self.link.streams.pop(rid, None)
        members = self.groups.get(group) if group is not None else None
        if members is not None:
            members.discard(rid)
            if not members:
                del self.groups[group]

    async def probe(self, timeout: float) -> bool:
        """Generate one token from a one-token prompt, outside the metrics: whether the worker
        answered within `timeout` seconds (what /health_generate reports)."""
        rid = f"health-{uuid.uuid4().hex}"
        q: asyncio.Queue = asyncio.Queue()
        self.link.streams[rid] = q
        try:
            self.link.send(ipc.GenerateReq(rid, [0], SamplingParams(max_new_tokens=1, temperature=0)))
            item = await asyncio.wait_for(q.get(), timeout)
            return isinstance(item, ipc.ReqOutput) and item.error is None
        except (RequestError, asyncio.TimeoutError):
            return False
        finally:
            self.link.streams.pop(rid, None)
            self.link.send(ipc.AbortReq(rid), required=False)  # a no-op once it finished

    async def stats(self) -> ipc.EngineStats:
        return await self.link.call(ipc.StatsReq())

    async def flush_cache(self) -> bool:
        return (await self.link.call(ipc.FlushCacheReq())).ok

