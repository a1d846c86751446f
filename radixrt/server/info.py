"""What the server serves, in OpenAI's and SGLang's shapes: /v1/models, /model_info, /server_info,
and how busy it is (/get_load, which sglang-router's load-aware policies poll).

SGLang's clients read `/get_model_info` (`model_path`, `tokenizer_path`, `is_generation`, ...)
and `/get_server_info` (its server arguments, flattened, plus the scheduler's numbers); newer
SGLang answers the same at `/model_info` and `/server_info`. Both names work here. The server
arguments are reported under SGLang's names for what radixrt supports (`context_length`,
`random_seed`, ...), next to radixrt's own `config` (EngineConfig) and worker `stats`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
from fastapi import APIRouter, Request

from radixrt import __version__
from radixrt.frontend.errors import RequestError
from radixrt.server.common import JSON, ServerState, state

router = APIRouter()  # behind the API key

WEIGHT_VERSION = "default"  # SGLang's default --weight-version; radixrt does not update weights in place


def _card(st: ServerState) -> dict[str, Any]:
    name = st.model_name
    return {"id": name, "object": "model", "created": 0, "owned_by": "radixrt", "root": name,
            "max_model_len": st.manager.max_context}  # fmt: skip


@router.get("/v1/models")
async def models(request: Request):
    return JSON({"object": "list", "data": [_card(state(request))]})


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request):
    """One model card; 404 for a name this server does not serve (as OpenAI, vLLM and SGLang)."""
    st = state(request)
    if model != st.model_name and model not in st.model_aliases:
        raise RequestError(f"the model {model!r} does not exist; this server serves {st.model_name!r}", 404, "model")
    return JSON(_card(st))


def model_info(st: ServerState) -> dict[str, Any]:
    config = st.manager.config
    return {
        "model_path": str(config.model) if config.model else str(st.manager.model_dir),
        "tokenizer_path": str(st.manager.model_dir),
        "served_model_name": st.model_name,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": WEIGHT_VERSION,
    }


@router.get("/get_model_info")
@router.get("/model_info")
async def get_model_info(request: Request):
    return JSON(model_info(state(request)))


def server_args(st: ServerState) -> dict[str, Any]:
    """The server's arguments under SGLang's names (radixrt's flags take these names too)."""
    c, s = st.manager.config, st.settings
    return {
        **model_info(st),
        "context_length": c.max_context_len,
        "dtype": c.dtype,
        "device": c.device,
        "quantization": c.quantization,
        "mem_fraction_static": c.mem_fraction_static,
        "max_total_tokens": c.max_total_tokens,
        "max_running_requests": c.max_running_requests,
        "chunked_prefill_size": c.chunked_prefill_size,
        "page_size": c.page_size,
        "schedule_policy": c.schedule_policy,
        "disable_radix_cache": c.disable_radix_cache,
        "attention_backend": c.attention_backend,
        "grammar_backend": c.grammar_backend,
        "chat_template": c.chat_template,
        "tool_call_parser": s.tool_call_parser,
        "reasoning_parser": s.reasoning_parser,
        "tp_size": c.tp_size,
        "random_seed": c.seed,
        "enable_metrics": True,
    }


@router.get("/get_server_info")
@router.get("/server_info")
async def get_server_info(request: Request):
    st = state(request)
    mgr = st.manager
    stats = msgspec.to_builtins(await mgr.stats()) if mgr.healthy else None
    return JSON(
        {
            **server_args(st),
            # SGLang's scheduler info
            "max_total_num_tokens": stats["total_pages"] * stats["page_size"] if stats else None,
            "max_req_input_len": mgr.max_context - 1,
            "internal_states": [stats] if stats else [],
            "version": __version__,
            # radixrt's own
            "model": st.model_name,
            "max_context": mgr.max_context,
            "vocab_size": mgr.vocab_size,
            "worker_pid": mgr.worker_pid,
            "worker_restarts": mgr.restarts,
            "healthy": mgr.healthy,
            "config": dataclasses.asdict(mgr.config),
            "stats": stats,
        }
    )


@router.get("/get_load")
async def get_load(request: Request):
    """SGLang's shape, one entry per data-parallel rank (a radixrt server is one rank): requests
    running or waiting, and KV tokens in use."""
    st = state(request)
    s = await st.manager.stats()
    used = (s.total_pages - s.free_pages - s.evictable_pages) * s.page_size  # held by requests, not idle cache
    return JSON([{"dp_rank": 0, "num_reqs": s.num_running + s.num_waiting, "num_waiting_reqs": s.num_waiting,
                  "num_tokens": used}])  # fmt: skip
