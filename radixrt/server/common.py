"""Helpers every endpoint shares: state, errors, sampling params, SSE, merged streams."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from radixrt.frontend.errors import RequestError, WorkerUnavailable
from radixrt.frontend.output import Collected, Delta
from radixrt.frontend.tokenizer_manager import TokenizerManager
from radixrt.sampling_params import SamplingParams
from radixrt.server.metrics import ServerMetrics
from radixrt.server.preparation import Preparer
from radixrt.server.protocol import SamplingFields
from radixrt.server.settings import ServerSettings


@dataclass
class ServerState:
    """What the endpoints reach through `request.app.state.rt`."""

    manager: TokenizerManager
    metrics: ServerMetrics
    settings: ServerSettings
    model_name: str
    preparer: Preparer
    model_aliases: set[str] = field(default_factory=set)
    health_probe: asyncio.Future | None = None  # the /health_generate probe in flight, shared by its callers


def state(request: Request) -> ServerState:
    return request.app.state.rt


class JSON(Response):
    """msgspec-encoded JSON: faster than json.dumps for the big logprob payloads."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


class SSEResponse(StreamingResponse):
    """Server-sent events; the body generator is always closed, which aborts its requests."""

    media_type = "text/event-stream"

    def __init__(self, content, **kw) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **kw.pop("headers", {})}
        super().__init__(content, headers=headers, **kw)

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    503: "unavailable_error",
}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSON:
    return JSON(error_body(message, ERROR_TYPES.get(status, "server_error"), param, code), status_code=status)


def check_model(st: ServerState, model: str | None) -> None:
    if model is not None and model != st.model_name and model not in st.model_aliases:
        raise RequestError(f"the model {model!r} does not exist; this server serves {st.model_name!r}", 400, "model")


# ----- request ids ---------------------------------------------------------------------------------

REQUEST_ID_HEADER = "X-Request-Id"


def request_id(request: Request, given: str | None = None) -> str:
    """The request's id: the body's (`request_id`, `rid`), else the X-Request-Id header's, else a fresh one.
    A header that is no usable id (over 256 printable ASCII characters, spaces) is a 400 naming it."""
    if given:
        return given
    header = request.headers.get(REQUEST_ID_HEADER)
    if header is None:
        return uuid.uuid4().hex
    if not 0 < len(header) <= 256 or not all("!" <= c <= "~" for c in header):
        raise RequestError(f"{REQUEST_ID_HEADER} must be 1-256 printable ASCII characters without spaces", 400,
                           REQUEST_ID_HEADER)  # fmt: skip
    return header


def stream_ids(rid: str, count: int) -> list[str]:
    """The ids of a request's `count` streams (n choices, a batch): its own id for one, else `<id>-<k>`."""
    return [rid] if count == 1 else [f"{rid}-{k}" for k in range(count)]


# SamplingParams field -> the OpenAI request field that sets it, for error messages.
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "top_logprobs": "top_logprobs"}


def make_params(
    values: dict[str, Any], settings: ServerSettings, vocab_size: int, openai_names: bool = True
) -> SamplingParams:
    """Validate sampling options against their rules, the vocabulary and the server's limits; a
    ValueError becomes a 400 naming the offending field."""

    def field_name(name: str) -> str:
        return _OPENAI_NAMES.get(name, name) if openai_names else f"sampling_params.{name}"

    try:
        params = SamplingParams.from_any(values)
        params.check_vocab(vocab_size)
    except ValueError as exc:
        message = str(exc)
        match = (
            re.search(r"sampling_params\.(\w+)", message)
            or re.search(r"at `\$\.(\w+)`", message)
            or re.search(r"unknown field `(\w+)`", message)
        )
        raise RequestError(message, 400, field_name(match.group(1)) if match else None) from None
    if params.seed is not None and not -(2**63) <= params.seed < 2**64:
        raise RequestError("seed must fit in 64 bits", 400, "seed")
    for name in ("stop", "stop_token_ids", "stop_regex"):
        if len(getattr(params, name)) > settings.max_stop_strings:
            raise RequestError(
                f"{field_name(name)}: at most {settings.max_stop_strings} may be given "
                f"(got {len(getattr(params, name)):,}; the server's --max-stop-strings)",
                400,
                field_name(name),
            )
    for name in ("stop", "stop_regex"):
        longest = max(getattr(params, name), key=len, default="")
        if len(longest) > settings.max_stop_chars:
            raise RequestError(
                f"{field_name(name)}: each may have at most {settings.max_stop_chars} characters "
                f"(got {len(longest):,}; the server's --max-stop-chars)",
                400,
                field_name(name),
            )
    return params


def max_new_tokens(mgr: TokenizerManager, prompt_len: int, requested: int | None, param: str) -> int:
    """The tokens a prompt may generate: as requested if prompt + that fits the context (else a 400
    naming `param`, as vLLM does), or, when not given, the rest of the context."""
    room = mgr.max_context - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise RequestError(
            f"{param} is {requested:,}, but this model's context of {mgr.max_context:,} tokens leaves room "
            f"for {room:,} after the prompt's {prompt_len:,}",
            400,
            param,
        )
    return requested


# ----- OpenAI request fields -> SamplingParams, usage -----------------------------------------


def sampling_dict(body: SamplingFields, max_tokens: int, seed: int | None, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": body.min_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop or [],
        "seed": seed,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
        "cache_salt": body.cache_salt,
        "include_stop_str_in_output": body.include_stop_str_in_output or body.no_stop_trim,
        **extra,
    }
    for name in ("top_k", "min_p", "repetition_penalty", "stop_token_ids", "stop_regex", "logit_bias"):
        if getattr(body, name) is not None:
            d[name] = getattr(body, name)
    return d


def seed_for(body: SamplingFields, i: int) -> int | None:
    """Choice i of n gets seed + i: reproducible, yet the n choices differ."""
    if body.seed is None:
        return None
    return (body.seed + i + 2**63) % 2**64 - 2**63


def finish_reason(d: Delta) -> str | None:
    return d.finish_reason  # "stop", "length", "abort" or "grammar_dead_end" (the output is incomplete)


def usage(lasts: list[Delta | None], n: int) -> dict[str, Any]:
    """Each prompt counts once, however many choices (n) it produced."""
    done = [d for d in lasts if d is not None]
    prompts = [lasts[i : i + n] for i in range(0, len(lasts), n)]
    prompt = sum(next((d.usage.prompt_tokens for d in p if d), 0) for p in prompts)
    cached = sum(max((d.usage.cached_tokens for d in p if d), default=0) for p in prompts)
    completion = sum(d.usage.completion_tokens for d in done)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def require_worker(st: ServerState) -> None:
    if not st.manager.healthy:
        raise WorkerUnavailable(f"the worker is not ready ({st.manager.unhealthy_reason}); retry shortly")


def sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(exc: RequestError) -> bytes:
    """An error after the stream started: one event with the error body (the openai client raises it)."""
    return sse(error_body(exc.message, ERROR_TYPES.get(exc.status, "server_error"), exc.param))


async def merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several request streams as (index, delta); closing this closes (aborts) them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as s:
            async for d in s:
                yield 0, d
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[Delta]) -> None:
        try:
            async with contextlib.aclosing(s):
                async for d in s:
                    q.put_nowait((i, d, None))
        except RequestError as exc:
            q.put_nowait((i, None, exc))
        else:
            q.put_nowait((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, d, exc = await q.get()
            if exc is not None:
                raise exc
            if d is None:
                remaining -= 1
            else:
                yield i, d
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def name_errors(stream: AsyncIterator[Delta], param: str | None) -> AsyncIterator[Delta]:
    """A request the worker refuses (a grammar that does not compile) is a 400 naming `param`."""
    try:
        async with contextlib.aclosing(stream) as s:
            async for d in s:
                yield d
    except RequestError as exc:
        if exc.status == 400 and exc.param is None and param:
            exc.param, exc.message = param, f"invalid {param}: {exc.message}"
        raise


async def prime(streams: list[AsyncIterator[Delta]]) -> list[AsyncIterator[Delta]]:
    """Wait for the first stream's first output, so that its errors come before the response
    starts (all streams of a request share its grammar). The other streams have not started."""
    first = streams[0]
    try:
        head = await anext(first)
    except StopAsyncIteration:
        return streams

    async def resumed() -> AsyncIterator[Delta]:
        async with contextlib.aclosing(first):
            yield head
            async for d in first:
                yield d

    return [resumed(), *streams[1:]]


def share_prompt(streams: list[AsyncIterator[Delta]], n: int) -> list[AsyncIterator[Delta]]:
    """For `n` choices of one prompt (consecutive in `streams`): start choice 0 alone, and the
    others once it has produced its first token, so they find the prompt in the prefix cache
    instead of all computing it in the same step."""
    if n == 1:
        return streams
    out: list[AsyncIterator[Delta]] = []
    for i in range(0, len(streams), n):
        gate = asyncio.Event()
        out.append(_opening(streams[i], gate))
        out += [_gated(s, gate) for s in streams[i + 1 : i + n]]
    return out


async def _opening(stream: AsyncIterator[Delta], gate: asyncio.Event) -> AsyncIterator[Delta]:
    try:
        async with contextlib.aclosing(stream) as s:
            async for d in s:
                gate.set()
                yield d
    finally:
        gate.set()


async def _gated(stream: AsyncIterator[Delta], gate: asyncio.Event) -> AsyncIterator[Delta]:
    await gate.wait()
    async with contextlib.aclosing(stream) as s:
        async for d in s:
            yield d


UNENFORCED_FIELD = "radixrt_unenforced"


def unenforced(lasts: list[Delta | None]) -> dict[str, list[str]]:
    """The response field of a lenient json_schema (response_format strict false or absent): JSON
    pointers of the keywords the grammar did not enforce. OpenAI clients keep an unknown
    top-level field as an extra attribute; {} when everything was enforced."""
    found = next((d.unenforced for d in lasts if d is not None and d.unenforced), None)
    return {UNENFORCED_FIELD: found} if found else {}


async def collect(streams: list[AsyncIterator[Delta]]) -> list[Collected]:
    results = [Collected() for _ in streams]
    async for i, d in merge(streams):
        results[i].add(d)
    return results
