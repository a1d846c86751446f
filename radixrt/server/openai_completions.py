"""OpenAI-compatible `/v1/completions` (legacy text completions), streamed (SSE) or not."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from radixrt.frontend.errors import RequestError
from radixrt.frontend.output import Delta
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
from radixrt.server.protocol import CompletionRequest

router = APIRouter(route_class=JSONRoute)


def prompt_list(mgr, prompt, add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each prompt (run by the preparer: tokenizing may be long)."""
    if isinstance(prompt, str):
        return [mgr.encode(prompt, "prompt", add_special_tokens)]
    if not prompt:
        raise RequestError("prompt must not be empty", 400, "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [mgr.check_ids(list(prompt))]
    if all(isinstance(p, str) for p in prompt):
        return [mgr.encode(p, "prompt", add_special_tokens) for p in prompt]
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
    grammar, param = body.grammar()
    prompts = await st.preparer.run(
        request, len(await request.body()), lambda: prompt_list(mgr, body.prompt, body.add_special_tokens)
    )
    want_lp = body.logprobs is not None
    # Unset, max_tokens is OpenAI's 16, or what is left of the context if less; set, it must fit.
    requested = body.max_tokens if "max_tokens" in body.model_fields_set else None
    plan = []
    for ids in prompts:
        max_tokens = max_new_tokens(mgr, len(ids), requested, "max_tokens")
        if requested is None and body.max_tokens is not None:
            max_tokens = min(max_tokens, body.max_tokens)
        extra = {
            "logprobs": want_lp,
            "top_logprobs": body.logprobs or 0,
            "prompt_logprobs": want_lp and body.echo and not body.stream,
        }
        for i in range(body.n):
            values = sampling_dict(body, max_tokens, seed_for(body, i), **extra, **grammar)
            plan.append((ids, make_params(values, st.settings, mgr.vocab_size)))
    stops = await st.preparer.stops(request, [p for _, p in plan], "stop")
    require_worker(st)
    base = request_id(request, body.request_id)
    sids, group = stream_ids(base, len(plan)), base if len(plan) > 1 else None
    mgr.check_rids_free(sids + [base], "request_id")
    streams = [name_errors(mgr.generate(ids, p, s, sid, group), param) for (ids, p), s, sid in zip(plan, stops, sids)]
    streams = share_prompt(streams, body.n)
    rid, created, headers = f"cmpl-{base}", int(time.time()), {REQUEST_ID_HEADER: base}
    if body.stream:
        if grammar:  # a grammar that does not compile is a 400, not an error event
            streams = await unless_disconnected(request, prime(streams))
        return SSEResponse(completion_stream(st, body, rid, created, plan, streams), headers=headers)
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
            **unenforced([r.last for r in results]),
        },
        headers=headers,
    )


async def completion_stream(st: ServerState, body: CompletionRequest, rid: str, created: int, plan, streams):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    tok = st.manager.tokenizer
    builders = [CompletionLogprobs(tok) for _ in plan]

    def chunk(i: int, text: str, reason: str | None = None, logprobs=None, extra: dict | None = None) -> bytes:
        out = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": st.model_name,
            "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}],
            **(extra or {}),
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
                yield chunk(i, "", finish_reason(d), extra=unenforced([d]))
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
