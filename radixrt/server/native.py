"""Native endpoints: SGLang-shaped `/generate`, tokenizer utilities, health, cache, stats, metrics.

`/generate` is what the DSL's `RuntimeEndpoint` talks to; its shape is documented in
docs/server.md and kept stable. Log-probabilities come as `[logprob, token_id, text|null]`.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import Response

from radixrt.frontend.errors import RequestError
from radixrt.frontend.output import Collected, Delta
from radixrt.sampling_params import SamplingParams
from radixrt.server.common import (
    JSON,
    SSE_DONE,
    ServerState,
    SSEResponse,
    check_model,
    collect,
    make_params,
    max_new_tokens,
    merge,
    name_errors,
    prime,
    require_worker,
    sse,
    sse_error,
    state,
)
from radixrt.server.disconnect import unless_disconnected
from radixrt.server.guard import JSONRoute
from radixrt.server.openai_chat import message_dicts
from radixrt.server.protocol import DetokenizeRequest, GenerateRequest, TokenizeRequest

router = APIRouter(route_class=JSONRoute)  # behind the API key
open_router = APIRouter()  # no key: liveness probes


@open_router.get("/health")
async def health(request: Request):
    mgr = state(request).manager
    if mgr.healthy:
        return JSON({"status": "ok"})
    return JSON({"status": "unhealthy", "reason": mgr.unhealthy_reason}, status_code=503)


@router.get("/v1/models")
async def models(request: Request):
    st = state(request)
    card = {
        "id": st.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "radixrt",
        "max_model_len": st.manager.max_context,
    }
    return JSON({"object": "list", "data": [card]})


@router.post("/v1/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    st = state(request)
    mgr = st.manager
    check_model(st, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise RequestError("pass exactly one of prompt or messages", 400, "prompt")

    def tokens() -> list[int]:  # counted whatever the context (no check_ids): this endpoint measures
        if body.messages is not None:
            text = mgr.render_chat(message_dicts(body.messages), body.add_generation_prompt)
            return mgr.tokenize(text, "messages", body.add_special_tokens)
        return mgr.tokenize(body.prompt, "prompt", body.add_special_tokens)

    ids = await st.preparer.run(request, len(await request.body()), tokens)
    return JSON({"tokens": ids, "count": len(ids), "max_model_len": mgr.max_context})


@router.post("/v1/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    st = state(request)
    check_model(st, body.model)
    if len(body.tokens) > st.manager.max_context:
        raise RequestError(f"at most {st.manager.max_context:,} tokens (this model's context)", 400, "tokens")
    if any(t >= st.manager.vocab_size for t in body.tokens):
        raise RequestError(f"token ids must be in [0, {st.manager.vocab_size})", 400, "tokens")
    return JSON({"prompt": st.manager.tokenizer.decode(body.tokens)})


@router.post("/flush_cache")
async def flush_cache(request: Request):
    """Drop every cached prefix; refused (flushed: false) while requests are running. POST only:
    a GET that changes state is one any web page can make a browser send."""
    require_worker(state(request))
    return JSON({"flushed": await state(request).manager.flush_cache()})


@router.get("/stats")
async def stats(request: Request):
    require_worker(state(request))
    return JSON(msgspec.to_builtins(await state(request).manager.stats()))


@router.get("/get_server_info")
async def server_info(request: Request):
    st = state(request)
    mgr = st.manager
    engine = msgspec.to_builtins(await mgr.stats()) if mgr.healthy else None
    return JSON(
        {
            "model": st.model_name,
            "model_path": str(mgr.model_dir),
            "max_context": mgr.max_context,
            "vocab_size": mgr.vocab_size,
            "worker_pid": mgr.worker_pid,
            "worker_restarts": mgr.restarts,
            "healthy": mgr.healthy,
            "config": dataclasses.asdict(mgr.config),
            "stats": engine,
        }
    )


@router.get("/get_model_info")
async def model_info(request: Request):
    st = state(request)
    return JSON({"model_path": str(st.manager.model_dir), "served_model_name": st.model_name, "is_generation": True})


@router.get("/metrics")
async def metrics(request: Request):
    st = state(request)
    if st.manager.healthy:
        try:
            st.metrics.update_from_stats(await st.manager.stats())
        except RequestError:
            pass
    return Response(st.metrics.render(), media_type="text/plain; version=0.0.4")


# ----- /generate -----------------------------------------------------------------------------


def _items(body: GenerateRequest, mgr) -> tuple[list[list[int]], bool]:
    if (body.text is None) == (body.input_ids is None):
        raise RequestError("pass exactly one of text or input_ids", 400, "text")
    if body.text is not None:
        if isinstance(body.text, str):
            return [mgr.encode(body.text, "text")], False
        if not body.text:
            raise RequestError("text must not be an empty list", 400, "text")
        return [mgr.encode(t, "text") for t in body.text], True
    if body.input_ids and isinstance(body.input_ids[0], list):
        return [mgr.check_ids(list(ids), "input_ids") for ids in body.input_ids], True
    return [mgr.check_ids(list(body.input_ids), "input_ids")], False


def _params(body: GenerateRequest, prompts: list[list[int]], st: ServerState) -> list[SamplingParams]:
    sp = body.sampling_params
    if isinstance(sp, list):
        if len(sp) != len(prompts):
            raise RequestError(f"got {len(sp)} sampling_params for {len(prompts)} prompts", 400, "sampling_params")
    else:
        sp = [sp or {}] * len(prompts)
    out = []
    for ids, values in zip(prompts, sp):
        values = dict(values)
        if body.return_logprob:
            values.update(logprobs=True, top_logprobs=body.top_logprobs_num)
            if 0 <= body.logprob_start_len < len(ids):
                values.update(prompt_logprobs=True, logprob_start_len=body.logprob_start_len)
        if body.cache_salt is not None and values.setdefault("cache_salt", body.cache_salt) != body.cache_salt:
            raise RequestError("cache_salt differs from sampling_params.cache_salt", 400, "cache_salt")
        params = make_params(values, st.settings, openai_names=False)
        if "max_new_tokens" in values:  # the default (128) is capped by the context instead
            max_new_tokens(st.manager, len(ids), params.max_new_tokens, "sampling_params.max_new_tokens")
        out.append(params)
    return out


def _grammar_param(p) -> str | None:
    spec = p.grammar_spec
    return f"sampling_params.{spec[0]}" if spec else None


def _finish_reason(d: Delta | None) -> dict | None:
    if d is None or not d.finished:
        return None
    if d.finish_reason == "length":
        return {"type": "length", "length": d.usage.completion_tokens}
    if d.finish_reason == "stop":
        return {"type": "stop", "matched": d.matched_stop}
    return {"type": d.finish_reason}


def _triples(tok, lps, ids, with_text: bool) -> list:
    return [[lp, t, tok.decode([t]) if with_text else None] for lp, t in zip(lps, ids)]


def _result(body: GenerateRequest, mgr, rid: str, ids: list[int], r: Collected) -> dict[str, Any]:
    d = r.last
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": _finish_reason(d),
        "prompt_tokens": d.usage.prompt_tokens if d else len(ids),
        "completion_tokens": d.usage.completion_tokens if d else len(r.token_ids),
        "cached_tokens": d.usage.cached_tokens if d else 0,
    }
    if body.return_logprob:
        tok, txt = mgr.tokenizer, body.return_text_in_logprobs
        meta["output_token_logprobs"] = _triples(tok, r.logprobs, r.token_ids, txt)
        meta["output_top_logprobs"] = [
            _triples(tok, [v for _, v in top], [t for t, _ in top], txt) for top in r.top_logprobs
        ]
        start = body.logprob_start_len
        inputs, tops = [], []
        if d is not None and d.finished and d.prompt_logprobs is not None and start >= 0:
            inputs = _triples(tok, d.prompt_logprobs[start:], ids[start:], txt)
            ptop = d.prompt_top_logprobs or []
            tops = [_triples(tok, [v for _, v in top], [t for t, _ in top], txt) for top in ptop[start:]]
        meta["input_token_logprobs"] = inputs
        meta["input_top_logprobs"] = tops
    return {"text": r.text, "output_ids": r.token_ids, "meta_info": meta}


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    st = state(request)
    mgr = st.manager
    prompts, batch = await st.preparer.run(request, len(await request.body()), lambda: _items(body, mgr))
    params = _params(body, prompts, st)
    stops = await st.preparer.stops(request, params, "sampling_params.stop")
    require_worker(st)
    rids = [uuid.uuid4().hex for _ in prompts]
    streams = [
        name_errors(mgr.generate(ids, p, s), _grammar_param(p)) for ids, p, s in zip(prompts, params, stops)
    ]
    if body.stream:
        if any(p.grammar_spec for p in params):  # a grammar that does not compile is a 400, not an error event
            streams = await unless_disconnected(request, prime(streams))
        return SSEResponse(_generate_stream(body, mgr, rids, prompts, streams, batch))
    start = time.monotonic()
    results = await unless_disconnected(request, collect(streams))
    out = [_result(body, mgr, rid, ids, r) for rid, ids, r in zip(rids, prompts, results)]
    for o in out:
        o["meta_info"]["e2e_latency"] = time.monotonic() - start
    return JSON(out if batch else out[0])


async def _generate_stream(body, mgr, rids, prompts, streams, batch: bool):
    """SGLang's streaming shape: each event carries the whole text and output_ids so far."""
    acc = [Collected() for _ in streams]
    try:
        async for i, d in merge(streams):
            acc[i].add(d)
            event = _result(body, mgr, rids[i], prompts[i], acc[i])
            if batch:
                event["index"] = i
            yield sse(event)
    except RequestError as exc:
        yield sse_error(exc)
    yield SSE_DONE
