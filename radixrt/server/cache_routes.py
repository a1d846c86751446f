"""Cache control endpoints: pin a prefix in memory, unpin it; metrics for pins and the disk tier.

    POST /pin_prefix    {"text" | "input_ids" | "messages", "cache_salt"?}
    POST /unpin_prefix  the same body

`/pin_prefix` first computes the prefix (a zero-token generation, so whatever of it is not cached
in memory or on disk is prefilled once), then pins its whole pages (cache/pins.py): they stay in
memory until unpinned or flushed, up to --max-pinned-tokens. `messages` are rendered with the
model's chat template without a generation prompt: a system prompt pinned that way is the prefix
of every chat that starts with it. The names follow the `pin_prefix` of SGLang's HiCache work and
of the vLLM pinned-prefix proposal. Pins and the disk tier also show in /get_server_info and
/stats (EngineStats) and, through `RefreshCacheMetrics`, in /metrics.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CollectorRegistry, Gauge
from pydantic import BaseModel, ConfigDict

from radixrt import ipc
from radixrt.frontend.chat_template import render_chat
from radixrt.frontend.errors import RequestError
from radixrt.sampling_params import SamplingParams
from radixrt.server.common import JSON, require_worker, state

router = APIRouter()


class PrefixRequest(BaseModel):
    """Exactly one of text, input_ids or messages; cache_salt as in a generation request."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    cache_salt: str | None = None


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
    ids = _prefix_ids(body, st.manager)
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
    ids = _prefix_ids(body, st.manager)
    require_worker(st)
    result = await st.manager.link.call(ipc.UnpinPrefixReq(ids, body.cache_salt))
    if not result.ok:
        raise RequestError(result.error or "no such pin", 404, "text")
    return _reply(result, ids, "unpinned")


class CacheMetrics:
    """Gauges for pins and the disk tier in a server's registry, set from the worker's EngineStats."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.pinned = Gauge("radixrt_pinned_tokens", "Tokens held in memory by pinned prefixes", registry=r)
        self.pins = Gauge("radixrt_num_pinned_prefixes", "Pinned prefixes", registry=r)
        self.disk = Gauge("radixrt_kv_disk_pages", "Disk tier pages by state", ["state"], registry=r)
        self.disk_hits = Gauge(
            "radixrt_kv_disk_hit_tokens", "Tokens loaded back from the disk tier since the worker started", registry=r
        )

    def update(self, s: ipc.EngineStats) -> None:
        self.pinned.set(s.pinned_pages * s.page_size)
        self.pins.set(s.num_pins)
        for label, value in (
            ("ready", s.disk_pages),
            ("capacity", s.disk_capacity_pages),
            ("written", s.disk_written_pages),
            ("dropped", s.disk_dropped_pages),
            ("corrupt", s.disk_corrupt_pages),
        ):
            self.disk.labels(label).set(value)
        self.disk_hits.set(s.disk_hit_tokens)


class RefreshCacheMetrics:
    """ASGI middleware: before /metrics renders, fetch the worker's stats into CacheMetrics (the
    route itself lives with the server's other metrics). Any other request passes straight through."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await _refresh(scope["app"])
        await self.app(scope, receive, send)


async def _refresh(app) -> None:
    st = getattr(app.state, "rt", None)
    if st is None or not st.manager.healthy:
        return
    if getattr(app.state, "cache_metrics", None) is None:
        app.state.cache_metrics = CacheMetrics(st.metrics.registry)
    try:
        stats = await st.manager.stats()
    except RequestError:  # the worker went away meanwhile: the gauges keep their last values
        return
    app.state.cache_metrics.update(stats)
