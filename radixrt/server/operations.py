"""Operating the server: liveness, metrics, cache flush, aborting a request, the worker's stats.

`/health`, `/health_generate` and `/metrics` need no API key, as in SGLang (and vLLM, which keys
only its /v1 routes): probes and Prometheus scrapers reach them without one. None of them returns
prompt or output text; `/health_generate` costs at most one one-token generation however often it
is called (concurrent probes share one, and a worker that produced output in the last second is
healthy without one).
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import Field

from radixrt.frontend.errors import RequestError
from radixrt.server.common import JSON, require_worker, state
from radixrt.server.fields import StrictBody
from radixrt.server.guard import JSONRoute
from radixrt.server.protocol import RequestId

router = APIRouter(route_class=JSONRoute)  # behind the API key
open_router = APIRouter()  # no key: probes and scrapers

HEALTH_GENERATE_TIMEOUT = 20.0  # s for the probe's one token (SGLang's SGLANG_HEALTH_CHECK_TIMEOUT)
BUSY_IS_HEALTHY_S = 1.0  # a worker that produced output this recently needs no probe
FLUSHED = (  # SGLang's answer, word for word: its clients read the status code
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)


@open_router.get("/health")
async def health(request: Request):
    mgr = state(request).manager
    if mgr.healthy:
        return JSON({"status": "ok"})
    return JSON({"status": "unhealthy", "reason": mgr.unhealthy_reason}, status_code=503)


@open_router.get("/health_generate")
async def health_generate(request: Request):
    """200 once the worker generated a token (or is visibly generating), else 503 (SGLang's probe)."""
    st = state(request)
    mgr = st.manager
    if not mgr.healthy:
        return JSON({"status": "unhealthy", "reason": mgr.unhealthy_reason}, status_code=503)
    if time.monotonic() - mgr.link.last_output < BUSY_IS_HEALTHY_S:
        return JSON({"status": "ok"})
    if st.health_probe is None or st.health_probe.done():
        st.health_probe = asyncio.ensure_future(mgr.probe(HEALTH_GENERATE_TIMEOUT))
    if await asyncio.shield(st.health_probe):
        return JSON({"status": "ok"})
    return JSON({"status": "unhealthy", "reason": "the worker did not generate a token in time"}, status_code=503)


@open_router.get("/metrics")
async def metrics(request: Request):
    st = state(request)
    if st.manager.healthy:
        try:
            st.metrics.update_from_stats(await st.manager.stats())
        except RequestError:  # the worker went away meanwhile: the gauges keep their last values
            pass
    return Response(st.metrics.render(), media_type="text/plain; version=0.0.4")


@router.post("/flush_cache")
async def flush_cache(request: Request):
    """Drop every cached prefix: 200 with SGLang's text, or a 400 while requests hold cached pages.
    POST only: a GET that changes state is one any web page can make a browser send."""
    st = state(request)
    require_worker(st)
    if await st.manager.flush_cache():
        return PlainTextResponse(FLUSHED)
    raise RequestError("the cache was not flushed: requests are running or waiting (retry once they finish)", 400)


class AbortRequest(StrictBody):
    """SGLang's body: the id a request was sent with (`rid`, `request_id` or X-Request-Id), or abort_all."""

    rid: RequestId | None = Field(None, description="the request's id; every stream of it (n, a batch) ends")
    abort_all: bool = False


@router.post("/abort_request")
async def abort_request(body: AbortRequest, request: Request):
    """End a running request as an abort: its response (or stream) finishes with finish_reason
    "abort" and the text so far. 200 whether or not it was still running, as in SGLang."""
    st = state(request)
    if (body.rid is None) == (not body.abort_all):
        raise RequestError("pass rid, or abort_all: true", 400, "rid")
    require_worker(st)
    return JSON({"aborted": st.manager.abort(None if body.abort_all else body.rid)})


@router.get("/stats")
async def stats(request: Request):
    require_worker(state(request))
    return JSON(msgspec.to_builtins(await state(request).manager.stats()))
