"""OpenAI-compatible `/v1/chat/completions`, streamed (SSE) or not."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from radixrt.frontend.chat_template import render_chat
from radixrt.frontend.tokenizer_manager import Delta, RequestError
from radixrt.server.common import (
    JSON,
    SSE_DONE,
    ServerState,
    SSEResponse,
    check_model,
    collect,
    finish_reason,
    make_params,
    merge,
    require_worker,
    sampling_dict,
    seed_for,
    share_prompt,
    sse,
    sse_error,
    state,
    unless_disconnected,
    usage,
)
from radixrt.server.protocol import ChatCompletionRequest

router = APIRouter()


def message_dicts(messages) -> list[dict]:
    """Pydantic messages -> the dicts chat templates expect ('developer' is OpenAI's new 'system')."""
    return [
        dict(m.model_dump(exclude_none=True), role="system" if m.role == "developer" else m.role) for m in messages
    ]


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
    messages = message_dicts(body.messages)
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
    streams = share_prompt([mgr.generate(ids, p) for p in params], body.n)
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
