"""OpenAI-compatible `/v1/chat/completions`, streamed (SSE) or not; tools in `tool_calls.py`, the
reply's reasoning / content / tool calls in `chat_reply.py`."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request

from radixrt.frontend.errors import RequestError
from radixrt.frontend.output import Delta
from radixrt.server.chat_reply import ReplyStream, reply_message
from radixrt.server.common import (
    JSON,
    REQUEST_ID_HEADER,
    SSE_DONE,
    ServerState,
    SSEResponse,
    check_model,
    collect,
    finish_reason,
    make_params,
    max_new_tokens,
    merge,
    name_errors,
    prime,
    request_id,
    require_worker,
    sampling_dict,
    seed_for,
    share_prompt,
    sse,
    sse_error,
    state,
    stream_ids,
    unenforced,
    usage,
)
from radixrt.server.disconnect import unless_disconnected
from radixrt.server.guard import JSONRoute
from radixrt.server.protocol import ChatCompletionRequest
from radixrt.server.tool_calls import ToolPlan, plan_tools

router = APIRouter(route_class=JSONRoute)


def message_dicts(messages) -> list[dict]:
    """Pydantic messages -> the dicts chat templates expect ('developer' is OpenAI's new 'system';
    tool-call arguments as objects, not OpenAI's JSON strings)."""
    out = []
    for m in messages:
        d = dict(m.model_dump(exclude_none=True), role="system" if m.role == "developer" else m.role)
        for call in d.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except ValueError:
                    pass
        out.append(d)
    return out


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
    grammar, param = body.grammar()
    tools = plan_tools(body, getattr(mgr.tokenizer, "chat_template", None), st.settings.tool_call_parser)
    if tools.schema is not None:
        if grammar:
            raise RequestError(f"tool_choice forces a tool call; it cannot be combined with {param}", 400, param)
        grammar, param = {"json_schema": tools.schema}, "tools"
    size = len(await request.body())  # what the template and the tokenizer may have to read, at most
    ids = await st.preparer.run(
        request,
        size,
        lambda: mgr.chat_ids(
            message_dicts(body.messages),
            body.add_generation_prompt,
            tools.template_tools,
            body.add_special_tokens,
            continue_final_message=body.continue_final_message,
            template_kwargs=body.chat_template_kwargs,
        ),
    )
    given = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = max_new_tokens(mgr, len(ids), getattr(body, given), given)
    top = body.top_logprobs or 0
    extra = dict(logprobs=body.logprobs, top_logprobs=top, **grammar)
    params = [
        make_params(sampling_dict(body, max_tokens, seed_for(body, i), **extra), st.settings, mgr.vocab_size)
        for i in range(body.n)
    ]
    stops = await st.preparer.stops(request, params, "stop")
    require_worker(st)
    base = request_id(request, body.request_id)
    sids, group = stream_ids(base, body.n), base if body.n > 1 else None
    mgr.check_rids_free(sids + [base], "request_id")
    rid, created, headers = f"chatcmpl-{base}", int(time.time()), {REQUEST_ID_HEADER: base}
    streams = [name_errors(mgr.generate(ids, p, s, sid, group), param) for p, s, sid in zip(params, stops, sids)]
    streams = share_prompt(streams, body.n)
    if body.stream:
        if grammar:  # a grammar that does not compile is a 400, not an error event
            streams = await unless_disconnected(request, prime(streams))
        return SSEResponse(chat_stream(st, body, rid, created, streams, tools, bool(grammar)), headers=headers)
    results = await unless_disconnected(request, collect(streams))
    choices = []
    for i, r in enumerate(results):
        lp = chat_logprobs(mgr.tokenizer, r.token_ids, r.logprobs, r.top_logprobs) if body.logprobs else None
        message, reason = reply_message(r.text, finish_reason(r.last), tools, reasoning_parser(st, body), bool(grammar))
        choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
    return JSON(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": st.model_name,
            "choices": choices,
            "usage": usage([r.last for r in results], body.n),
            **unenforced([r.last for r in results]),
        },
        headers=headers,
    )


def reasoning_parser(st: ServerState, body: ChatCompletionRequest) -> str | None:
    """The server's --reasoning-parser, unless the request sets separate_reasoning false (SGLang's field)."""
    return st.settings.reasoning_parser if body.separate_reasoning else None


async def chat_stream(
    st: ServerState, body: ChatCompletionRequest, rid: str, created: int, streams, tools: ToolPlan, constrained: bool
):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(i: int, delta: dict, reason: str | None = None, logprobs=None, extra: dict | None = None) -> bytes:
        out = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": st.model_name,
            "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}],
            **(extra or {}),
        }
        if include_usage:
            out["usage"] = None
        return sse(out)

    lasts: list[Delta | None] = [None] * len(streams)
    # Thinking goes to reasoning_content; tool calls stream as OpenAI's tool_calls deltas, their
    # arguments in fragments; text that may still become either is held back (chat_reply.py).
    replies = [ReplyStream(tools, reasoning_parser(st, body), constrained) for _ in streams]
    try:
        for i in range(len(streams)):
            yield chunk(i, {"role": "assistant", "content": None if tools.schema else ""})
        async for i, d in merge(streams):
            lasts[i] = d
            lp = None
            if body.logprobs and d.token_ids and d.logprobs:
                lp = chat_logprobs(st.manager.tokenizer, d.token_ids, d.logprobs, d.top_logprobs)
            deltas = replies[i].feed(d.text)
            for k, delta in enumerate(deltas or ([{"content": ""}] if lp else [])):
                yield chunk(i, delta, logprobs=lp if k == 0 else None)
            if d.finished:
                deltas, reason = replies[i].finish(finish_reason(d))
                for delta in deltas:
                    yield chunk(i, delta)
                yield chunk(i, {}, reason, extra=unenforced([d]))
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
