"""The FastAPI app: lifespan (worker start/stop), request guards, API key, OpenAI-style error bodies, routers."""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from radixrt import __version__
from radixrt.config import EngineConfig
from radixrt.frontend.errors import RequestError
from radixrt.frontend.tokenizer_manager import TokenizerManager
from radixrt.server import cache_routes, info, native, openai_chat, openai_completions, operations
from radixrt.server.common import REQUEST_ID_HEADER, ServerState, error_response, state
from radixrt.server.disconnect import ClientDisconnected
from radixrt.server.fields import FIELD_ERROR, UNSUPPORTED_FIELD
from radixrt.server.guard import RequestGuard
from radixrt.server.metrics import ServerMetrics
from radixrt.server.preparation import Preparer
from radixrt.server.settings import ServerSettings

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when one is set")
_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}
# pydantic errors that only say the input was of another type: for a union field it reports one per
# branch, and the branch whose type did match (if any) is the one that says what is wrong.
_MISMATCH = re.compile(r"_type$|_parsing$|^none_required$|^is_instance_of$")


async def require_api_key(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    key = state(request).settings.api_key
    if not key:
        return
    given = creds.credentials if creds is not None else ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise RequestError("invalid or missing API key: send 'Authorization: Bearer <key>'", 401)


def model_name(config: EngineConfig, settings: ServerSettings) -> str:
    """--served-model-name, else the --model path as given (SGLang's default)."""
    if settings.served_model_name:
        return settings.served_model_name
    return DEFAULT_MODEL_NAME if config.model is None else str(config.model)


def build_app(
    config: EngineConfig,
    settings: ServerSettings | None = None,
    on_fatal: Callable[[], None] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = ServerMetrics(model_name(config, settings))
    manager = TokenizerManager(config, settings.restart_worker, on_fatal, metrics, settings.max_prompt_chars)
    preparer = Preparer(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await manager.start()
        except BaseException:
            await manager.close()
            raise
        # "default" as SGLang accepts it (its examples send it), "unknown" as sglang-router fills in
        # for a request that names none, and the model's folder and file names: one server, one model.
        aliases = {"default", "unknown", str(manager.model_dir)} | _names_of(config.model)
        app.state.rt = ServerState(manager, metrics, settings, model_name(config, settings), preparer, aliases)
        if on_ready:
            on_ready(app.state.rt.model_name)
        yield
        preparer.close()
        await manager.close()

    app = FastAPI(
        title="radixrt",
        version=__version__,
        description="A prefix-caching LLM runtime: OpenAI-compatible and native endpoints.",
        lifespan=lifespan,
    )
    app.add_middleware(RequestGuard, allowed_hosts=settings.allowed_hosts, max_body_bytes=settings.max_request_bytes)
    app.add_middleware(EchoRequestId)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(operations.open_router)
    for module in (openai_chat, openai_completions, native, info, operations, cache_routes):
        app.include_router(module.router, dependencies=[Depends(require_api_key)])
    return app


def _names_of(model: str | None) -> set[str]:
    """A model path as given, and the names it is known by: its folder's or its .gguf file's stem."""
    if model is None:
        return {DEFAULT_MODEL_NAME}
    path = Path(model)
    return {str(model), path.stem if path.suffix == ".gguf" else path.name}


class EchoRequestId:
    """ASGI middleware: every response carries the request's X-Request-Id back (generation routes
    set their own when the client sent none: the id they made)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        given = dict(scope.get("headers") or ()).get(b"x-request-id") if scope["type"] == "http" else None
        if given is None:
            return await self.app(scope, receive, send)

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    message = dict(message, headers=[*headers, (REQUEST_ID_HEADER.lower().encode(), given)])
            await send(message)

        await self.app(scope, receive, send_with_id)


async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    if errors[0].get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON", None, "json_invalid")
    named = next((e for e in errors if e.get("type") in (UNSUPPORTED_FIELD, FIELD_ERROR)), None)
    if named is not None:  # a field the server does not honour, or one a model validator names (server/fields.py)
        param = ".".join([*_field_path(named), named["ctx"]["field"]])
        return error_response(400, f"{param}: {named['msg']}", param, named["type"])
    field_errors = [e for e in errors if e.get("loc", ())[:2] == errors[0].get("loc", ())[:2]]
    err = min(field_errors, key=_branch_rank)
    param = ".".join(_field_path(err)) or None
    message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
    return error_response(400, message, param, err.get("type"))


def _field_path(err: dict) -> list[str]:
    """The request field an error is about, without pydantic's union branch names."""
    path = [str(p) for p in err.get("loc", ()) if p != "body"]
    return [p for p in path if p.lower() not in _TYPE_NAMES and "[" not in p and "-" not in p]


async def _request_error(request: Request, exc: RequestError):
    return error_response(exc.status, exc.message, exc.param)


def _branch_rank(err: dict) -> tuple:
    """Of one field's errors: a branch whose type matched first, then the one that got furthest in."""
    indices = [p for p in err.get("loc", ()) if isinstance(p, int)]
    return bool(_MISMATCH.search(err.get("type", ""))), -len(err.get("loc", ())), [-i for i in indices]


async def _http_error(request: Request, exc: HTTPException):
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "param", None), getattr(exc, "code", None))


async def _client_gone(request: Request, exc: ClientDisconnected):
    return Response(status_code=499)


async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}")
