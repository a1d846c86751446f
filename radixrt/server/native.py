"""Native endpoints: SGLang-shaped `/generate`, and the tokenizer's `/tokenize` and `/detokenize`.

`/generate` is what the DSL's `RuntimeEndpoint` talks to; its shape is documented in
docs/server.md and kept stable. Log-probabilities come as `[logprob, token_id, text|null]`.
A request of P prompts with `n` samples each runs P x n streams and answers them as one flat
list, prompt by prompt (SGLang's order); their ids are `rid` (or `<rid>-<k>`), in a group
that `/abort_request` ends as a whole.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from fastapi import APIRouter, Request

from radixrt.frontend.errors import RequestError
from radixrt.frontend.output import Collected, Delta, Usage
from radixrt.sampling_params import SamplingParams
from radixrt.server.common import (
    JSON,
    REQUEST_ID_HEADER,
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
    request_id,
    require_worker,
    sse,
    sse_error,
    state,
    stream_ids,
)
from radixrt.server.disconnect import unless_disconnected
from radixrt.server.guard import JSONRoute
from radixrt.server.openai_chat import message_dicts
from radixrt.server.protocol import MAX_N, DetokenizeRequest, GenerateRequest, TokenizeRequest

router = APIRouter(route_class=JSONRoute)  # behind the API key


@router.post("/v1/tokenize")
@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    """vLLM's shape at vLLM's path (and SGLang's /v1 one): {tokens, count, max_model_len[, token_strs]}."""
    st = state(request)
    mgr = st.manager
    check_model(st, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise RequestError("pass exactly one of prompt or messages", 400, "prompt")
    if body.continue_final_message and "add_generation_prompt" in body.model_fields_set and body.add_generation_prompt:
        raise RequestError("continue_final_message takes no generation prompt", 400, "add_generation_prompt")

    def tokens() -> list[int]:  # counted whatever the context (no check_ids): this endpoint measures
        if body.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            text = mgr.render_chat(
                message_dicts(body.messages),
                body.add_generation_prompt and not body.continue_final_message,
                tools,
                continue_final_message=body.continue_final_message,
                template_kwargs=body.chat_template_kwargs,
            )
            return mgr.tokenize(text, "messages", body.add_special_tokens)
        return mgr.tokenize(body.prompt, "prompt", body.add_special_tokens)

    ids = await st.preparer.run(request, len(await request.body()), tokens)
    out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": mgr.max_context}
    if body.return_token_strs:
        out["token_strs"] = mgr.tokenizer.convert_ids_to_tokens(ids)
    return JSON(out)


@router.post("/v1/detokenize")
@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    st = state(request)
    check_model(st, body.model)
    if len(body.tokens) > st.manager.max_context:
        raise RequestError(f"at most {st.manager.max_context:,} tokens (this model's context)", 400, "tokens")
    if any(t >= st.manager.vocab_size for t in body.tokens):
        raise RequestError(f"token ids must be in [0, {st.manager.vocab_size})", 400, "tokens")
    return JSON({"prompt": st.manager.tokenizer.decode(body.tokens)})


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


def _params(body: GenerateRequest, prompts: list[list[int]], st: ServerState) -> list[list[SamplingParams]]:
    """Each prompt's n samples' params (sample j's seed is the seed + j, as for OpenAI's n)."""
    sp = body.sampling_params
    if isinstance(sp, list):
        if len(sp) != len(prompts):
            raise RequestError(f"got {len(sp)} sampling_params for {len(prompts)} prompts", 400, "sampling_params")
    else:
        sp = [sp or {}] * len(prompts)
    out = []
    for ids, values in zip(prompts, sp):
        values = dict(values)
        n = values.pop("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
            raise RequestError(f"sampling_params.n must be an integer in [1, {MAX_N}] (got {n!r})", 400,
                               "sampling_params.n")  # fmt: skip
        if values.get("custom_params") is not None:
            raise RequestError("sampling_params.custom_params is not supported: it feeds custom logit processors, "
                               "which radixrt does not run (logit_bias is supported)", 400,
                               "sampling_params.custom_params")  # fmt: skip
        values.pop("custom_params", None)
        if body.return_logprob:
            values.update(logprobs=True, top_logprobs=body.top_logprobs_num)
            if 0 <= body.logprob_start_len < len(ids):
                values.update(prompt_logprobs=True, logprob_start_len=body.logprob_start_len)
        if body.cache_salt is not None and values.setdefault("cache_salt", body.cache_salt) != body.cache_salt:
            raise RequestError("cache_salt differs from sampling_params.cache_salt", 400, "cache_salt")
        params = make_params(values, st.settings, st.manager.vocab_size, openai_names=False)
        if "max_new_tokens" in values:  # the default (128) is capped by the context instead
            max_new_tokens(st.manager, len(ids), params.max_new_tokens, "sampling_params.max_new_tokens")
        seed = params.seed
        out.append([params if seed is None else _with_seed(params, (seed + j + 2**63) % 2**64 - 2**63)
                    for j in range(n)])  # fmt: skip
    return out


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return msgspec.structs.replace(params, seed=seed)


StreamIds = list[tuple[str, str | None]]  # each stream's (id, group)


def _stream_ids(body: GenerateRequest, request: Request, samples: list[int]) -> tuple[str, StreamIds]:
    """The request's id and each stream's (id, group): `rid` as given (one per prompt for a list),
    else X-Request-Id, else a fresh one; `<id>-<k>` for several streams."""
    if isinstance(body.rid, list):
        if len(body.rid) != len(samples):
            raise RequestError(f"got {len(body.rid)} rids for {len(samples)} prompts", 400, "rid")
        return body.rid[0], [(sid, rid if n > 1 else None) for rid, n in zip(body.rid, samples)
                             for sid in stream_ids(rid, n)]  # fmt: skip
    base = request_id(request, body.rid)
    prompts = stream_ids(base, len(samples))
    ids = [sid for rid, n in zip(prompts, samples) for sid in stream_ids(rid, n)]
    return base, [(sid, base if len(ids) > 1 else None) for sid in ids]


def _grammar_param(p) -> str | None:
    spec = p.grammar_spec
    return f"sampling_params.{'json_schema' if spec[0] == 'json_schema_lenient' else spec[0]}" if spec else None


def _finish_reason(d: Delta | None) -> dict | None:
    if d is None or not d.finished:
        return None
    if d.finish_reason == "length":
        return {"type": "length", "length": d.usage.completion_tokens}
    if d.finish_reason == "stop":
        return {"type": "stop", "matched": d.matched_stop}
    return {"type": d.finish_reason}


def _speculation(u: Usage) -> dict[str, Any]:
    """SGLang's speculative-decoding fields: verify steps, drafts verified and kept, and the accept length
    (tokens per verify step: 1 + kept drafts per step)."""
    return {
        "spec_verify_ct": u.spec_verify_ct,
        "spec_draft_token_num": u.spec_draft_tokens,
        "spec_accept_token_num": u.spec_accepted_tokens,
        "spec_accept_rate": u.spec_accepted_tokens / u.spec_draft_tokens if u.spec_draft_tokens else 0.0,
        "spec_accept_length": 1 + u.spec_accepted_tokens / u.spec_verify_ct,
    }


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
    if d is not None and d.unenforced:  # sampling_params.json_schema_strict false: what was dropped
        meta["unenforced"] = d.unenforced
    if d is not None and d.usage.spec_verify_ct:
        meta.update(_speculation(d.usage))
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
    per_prompt = _params(body, prompts, st)
    base, ids = _stream_ids(body, request, [len(ps) for ps in per_prompt])
    mgr.check_rids_free([sid for sid, _ in ids] + [g for _, g in ids if g], "rid")
    prompts = [ids_ for ids_, ps in zip(prompts, per_prompt) for _ in ps]  # one per stream
    params = [p for ps in per_prompt for p in ps]
    batch = batch or len(params) > 1
    stops = await st.preparer.stops(request, params, "sampling_params.stop")
    require_worker(st)
    streams = [
        name_errors(mgr.generate(ids_, p, s, sid, group), _grammar_param(p))
        for ids_, p, s, (sid, group) in zip(prompts, params, stops, ids)
    ]
    rids = [sid for sid, _ in ids]
    headers = {} if isinstance(body.rid, list) else {REQUEST_ID_HEADER: base}
    if body.stream:
        if any(p.grammar_spec for p in params):  # a grammar that does not compile is a 400, not an error event
            streams = await unless_disconnected(request, prime(streams))
        return SSEResponse(_generate_stream(body, mgr, rids, prompts, streams, batch), headers=headers)
    start = time.monotonic()
    results = await unless_disconnected(request, collect(streams))
    out = [_result(body, mgr, rid, ids_, r) for rid, ids_, r in zip(rids, prompts, results)]
    for o in out:
        o["meta_info"]["e2e_latency"] = time.monotonic() - start
    return JSON(out if batch else out[0], headers=headers)


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
