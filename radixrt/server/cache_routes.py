"""Cache control endpoints: pin a prefix in memory, unpin it.

    POST /pin_prefix    {"text" | "input_ids" | "messages", "cache_salt"?}
    POST /unpin_prefix  the same body

`/pin_prefix` first computes the prefix (a zero-token generation, so whatever of it is not cached
in memory or on disk is prefilled once), then pins its whole pages (cache/pins.py): they stay in
memory until unpinned or flushed, up to --max-pinned-tokens. `messages` are rendered with the
model's chat template without a generation prompt: a system prompt pinned that way is the prefix
of every chat that starts with it. The names follow the `pin_prefix` of SGLang's HiCache work and
of the vLLM pinned-prefix proposal. Pins and the disk tier also show in /get_server_info,
/stats (EngineStats) and /metrics (server/metrics.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from radixrt import ipc
from radixrt.frontend.chat_template import render_chat
from radixrt.frontend.errors import RequestError
from radixrt.sampling_params import MAX_SALT_CHARS, SamplingParams
from radixrt.server.common import JSON, require_worker, state
from radixrt.server.guard import JSONRoute
from radixrt.server.protocol import MAX_MESSAGES

router = APIRouter(route_class=JSONRoute)  # a bounded body, errors as JSON


class PrefixRequest(BaseModel):
    """Exactly one of text, input_ids or messages; cache_salt as in a generation request."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = Field(None, max_length=MAX_MESSAGES)
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_SALT_CHARS)


def _prefix_ids(body: PrefixRequest, mgr) -> list[int]:
    given = [name for name in ("text", "input_ids", "messages") if getattr(body, name) is not None]
    if len(given) != 1:
        raise RequestError("pass exactly one of text, input_ids or messages", 400, "text")
    if body.text is not None:
        return mgr.encode(body.text, "text")
    if body.input_ids is not None:
        return mgr.check_ids(list(body.input_ids), "input_ids")
    try:
        text = render_chat(mgr.tokenizer, body.messages, add_generation_prompt=False)
    except Exception as exc:  # the model's template rejected the messages
        raise RequestError(f"the chat template rejected these messages: {exc}", 400, "messages") from None
    return mgr.encode(text, "messages")


async def _prefix_ids_off_loop(body: PrefixRequest, request: Request) -> list[int]:
    """The prefix's token ids, templated and tokenized off the event loop (server/preparation.py)."""
    st = state(request)
    return await st.preparer.run(request, len(await request.body()), lambda: _prefix_ids(body, st.manager))


def _reply(result: ipc.PinResult, ids: list[int], key: str) -> JSON:
    body = {
        key: result.ok,
        "prompt_tokens": len(ids),
        "pinned_tokens": result.pinned_tokens,
        "total_pinned_tokens": result.total_pinned_tokens,
        "max_pinned_tokens": result.max_pinned_tokens,
    }
    if result.error:
        body["error"] = result.error
    return JSON(body)


@router.post("/pin_prefix")
async def pin_prefix(body: PrefixRequest, request: Request):
    """Compute the prefix if needed, then keep its whole pages in memory."""
    st = state(request)
    ids = await _prefix_ids_off_loop(body, request)
    require_worker(st)
    async for _ in st.manager.generate(ids, SamplingParams(max_new_tokens=0, cache_salt=body.cache_salt)):
        pass
    result = await st.manager.link.call(ipc.PinPrefixReq(ids, body.cache_salt))
    if not result.ok:
        raise RequestError(result.error or "the prefix could not be pinned", 409, "text")
    return _reply(result, ids, "pinned")


@router.post("/unpin_prefix")
async def unpin_prefix(body: PrefixRequest, request: Request):
    """Drop the pin taken with the same prefix and cache_salt; its pages become evictable again."""
    st = state(request)
    ids = await _prefix_ids_off_loop(body, request)
    require_worker(st)
    result = await st.manager.link.call(ipc.UnpinPrefixReq(ids, body.cache_salt))
    if not result.ok:
        raise RequestError(result.error or "no such pin", 404, "text")
    return _reply(result, ids, "unpinned")
