"""OpenAI-compatible `/v1/chat/completions` and `/v1/completions`, streamed (SSE) or not."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from radixrt.frontend.chat_template import render_chat
from radixrt.frontend.tokenizer_manager import Delta, RequestError, WorkerUnavailable
from radixrt.server.common import (
    JSON,
    SSE_DONE,
    ServerState,
    SSEResponse,
    check_model,
    collect,
    make_params,
    merge,
    sse,
    sse_error,
    state,
    unless_disconnected,
)
from radixrt.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

router = APIRouter()


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
        **extra,
    }
    for name in ("top_k", "min_p", "repetition_penalty", "stop_token_ids"):
        if getattr(body, name) is not None:
            d[name] = getattr(body, name)
    return d


def seed_for(body: SamplingFields, i: int) -> int | None:
    """Choice i of n gets seed + i: reproducible, yet the n choices differ."""
    if body.seed is None:
        return None
    return (body.seed + i + 2**63) % 2**64 - 2**63


def finish_reason(d: Delta) -> str | None:
    return {"grammar_dead_end": "stop"}.get(d.finish_reason, d.finish_reason)


def usage(lasts: list[Delta | None], n: int) -> dict[str, Any]:
    """Each prompt counts once, however many choices (n) it produced."""
    done = [d for d in lasts if d is not None]
    prompts = [lasts[i : i + n] for i in range(0, len(lasts), n)]
    prompt = sum(next((d.prompt_tokens for d in p if d), 0) for p in prompts)
    cached = sum(max((d.cached_tokens for d in p if d), default=0) for p in prompts)
    completion = sum(d.completion_tokens for d in done)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def require_worker(st: ServerState) -> None:
    if not st.manager.healthy:
        raise WorkerUnavailable(f"the worker is not ready ({st.manager.unhealthy_reason}); retry shortly")


# ----- chat ----------------------------------------------------------------------------------


def chat_logprobs(tok, ids: list[int], lps: list[float], tops: list | None) -> dict:
    def entry(tid: int, lp: float) -> dict:
        s = tok.decode([tid])
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    content = []
    for k, (tid, lp) in enumerate(zip(ids, lps)):
        e = entry(tid, lp)
        e["top_logprobs"] = [entry(t, v) for t, v in tops[k]] if tops and k < len(tops) else []
        content.append(e)
    return {"content": content}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = state(request)
    mgr = st.manager
    check_model(st, body.model)
    if body.response_format is not None and body.response_format.type != "text":
        raise RequestError("response_format json_object/json_schema is not supported yet", 400, "response_format")
    messages = [
        dict(m.model_dump(exclude_none=True), role="system" if m.role == "developer" else m.role)
        for m in body.messages
    ]
    try:
        text = render_chat(mgr.tokenizer, messages, body.add_generation_prompt, body.tools)
    except ValueError as exc:
        raise RequestError(str(exc), 400, "messages") from None
    except Exception as exc:  # a Jinja error raised by the model's own template
        raise RequestError(f"the chat template rejected these messages: {exc}", 400, "messages") from None
    ids = mgr.encode(text, param="messages")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = mgr.max_context - len(ids)
    top = body.top_logprobs or 0
    params = [
        make_params(sampling_dict(body, max_tokens, seed_for(body, i), logprobs=body.logprobs, top_logprobs=top))
        for i in range(body.n)
    ]
    require_worker(st)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    streams = [mgr.generate(ids, p) for p in params]
    if body.stream:
        return SSEResponse(chat_stream(st, body, rid, created, streams))
    results = await unless_disconnected(request, collect(streams))
    choices = []
    for i, r in enumerate(results):
        lp = chat_logprobs(mgr.tokenizer, r.token_ids, r.logprobs, r.top_logprobs) if body.logprobs else None
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": lp,
                "finish_reason": finish_reason(r.last),
            }
        )
    return JSON(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": st.model_name,
            "choices": choices,
            "usage": usage([r.last for r in results], body.n),
        }
    )


async def chat_stream(st: ServerState, body: ChatCompletionRequest, rid: str, created: int, streams):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(i: int, delta: dict, reason: str | None = None, logprobs=None) -> bytes:
        out = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": st.model_name,
            "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}],
        }
        if include_usage:
            out["usage"] = None
        return sse(out)

    lasts: list[Delta | None] = [None] * len(streams)
    try:
        for i in range(len(streams)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, d in merge(streams):
            lasts[i] = d
            lp = None
            if body.logprobs and d.token_ids and d.logprobs:
                lp = chat_logprobs(st.manager.tokenizer, d.token_ids, d.logprobs, d.top_logprobs)
            if d.text or lp:
                yield chunk(i, {"content": d.text}, logprobs=lp)
            if d.finished:
                yield chunk(i, {}, finish_reason(d))
        if include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": st.model_name,
                    "choices": [],
                    "usage": usage(lasts, body.n),
                }
            )
    except RequestError as exc:
        yield sse_error(exc)
    yield SSE_DONE


# ----- completions ---------------------------------------------------------------------------


def prompt_list(mgr, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [mgr.encode(prompt)]
    if not prompt:
        raise RequestError("prompt must not be empty", 400, "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [mgr.check_ids(list(prompt))]
    if all(isinstance(p, str) for p in prompt):
        return [mgr.encode(p) for p in prompt]
    return [mgr.check_ids(list(p)) for p in prompt]


class CompletionLogprobs:
    """OpenAI's legacy logprobs object, built incrementally (offsets continue across chunks)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.offset = 0

    def build(self, ids: list[int], lps: list, tops: list | None) -> dict:
        tokens = [self.tok.decode([t]) for t in ids]
        offsets = []
        for s in tokens:
            offsets.append(self.offset)
            self.offset += len(s)
        top = [
            None if lp is None else {self.tok.decode([t]): v for t, v in (tops[k] if tops and k < len(tops) else [])}
            for k, lp in enumerate(lps)
        ]
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": top, "text_offset": offsets}

    def prompt(self, ids: list[int], d: Delta) -> dict:
        lps = d.prompt_logprobs or [None] * len(ids)
        return self.build(ids, lps, d.prompt_top_logprobs)


def merge_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    st = state(request)
    mgr = st.manager
    check_model(st, body.model)
    if body.suffix:
        raise RequestError("suffix is not supported", 400, "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise RequestError("best_of is not supported (leave it unset or equal to n)", 400, "best_of")
    prompts = prompt_list(mgr, body.prompt)
    want_lp = body.logprobs is not None
    streams, plan = [], []
    for ids in prompts:
        max_tokens = body.max_tokens if body.max_tokens is not None else mgr.max_context - len(ids)
        extra = {"logprobs": want_lp, "top_logprobs": body.logprobs or 0, "prompt_logprobs": want_lp and body.echo and not body.stream}
        for i in range(body.n):
            plan.append((ids, make_params(sampling_dict(body, max_tokens, seed_for(body, i), **extra))))
    require_worker(st)
    streams = [mgr.generate(ids, p) for ids, p in plan]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return SSEResponse(completion_stream(st, body, rid, created, plan, streams))
    results = await unless_disconnected(request, collect(streams))
    choices = []
    for i, ((ids, _), r) in enumerate(zip(plan, results)):
        text, lp = r.text, None
        if body.echo:
            text = mgr.tokenizer.decode(ids) + text
        if want_lp:
            builder = CompletionLogprobs(mgr.tokenizer)
            lp = builder.prompt(ids, r.last) if body.echo else None
            lp = merge_logprobs(lp, builder.build(r.token_ids, r.logprobs, r.top_logprobs))
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish_reason(r.last)})
    return JSON(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": st.model_name,
            "choices": choices,
            "usage": usage([r.last for r in results], body.n),
        }
    )


async def completion_stream(st: ServerState, body: CompletionRequest, rid: str, created: int, plan, streams):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    tok = st.manager.tokenizer
    builders = [CompletionLogprobs(tok) for _ in plan]

    def chunk(i: int, text: str, reason: str | None = None, logprobs=None) -> bytes:
        out = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": st.model_name,
            "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}],
        }
        if include_usage:
            out["usage"] = None
        return sse(out)

    lasts: list[Delta | None] = [None] * len(streams)
    try:
        if body.echo:
            for i, (ids, _) in enumerate(plan):
                yield chunk(i, tok.decode(ids))
        async for i, d in merge(streams):
            lasts[i] = d
            lp = None
            if body.logprobs is not None:
                lp = builders[i].build(d.token_ids, d.logprobs or [], d.top_logprobs)
            if d.text or d.token_ids:
                yield chunk(i, d.text, logprobs=lp)
            if d.finished:
                yield chunk(i, "", finish_reason(d))
        if include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": st.model_name,
                    "choices": [],
                    "usage": usage(lasts, body.n),
                }
            )
    except RequestError as exc:
        yield sse_error(exc)
    yield SSE_DONE
