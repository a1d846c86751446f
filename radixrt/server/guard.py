"""What a request must be before any handler sees it: for an allowed host, no bigger than
--max-request-bytes, and, with a body, JSON that is valid Unicode text.

- Size: a body over the limit is refused with a 413 before it is read whole: at once when its
  Content-Length says so, else as soon as the bytes received pass the limit.
- Host: a web page can point a DNS name it controls at 127.0.0.1 and have the visitor's browser
  call this server as a "same-origin" site (DNS rebinding); the Host header still carries that
  name. `HostGuard` answers only the names it is told (--allowed-hosts; by default, on a
  loopback address, the localhost names and that address).
- Content-Type: a browser sends a cross-site POST without asking first (no CORS preflight)
  only with a form or text/plain body. JSON routes answer anything but `application/json` with
  a 415, so such a request never runs.
- Lone surrogates: JSON can spell half of a UTF-16 pair ("\\ud800") alone, and Python keeps it,
  but it is not Unicode: the tokenizer, msgpack and the grammar compilers cannot encode it.
  Refused here with a 400 naming the field, before any of them sees it.

The body itself is parsed on the event loop (JSON, then pydantic), bounded by the size limit; the
cyclic garbage collector is paused meanwhile, or a body of a million tiny lists would trigger
collections that walk the whole heap, over and over (1.3 s instead of 0.06 s for 4 MiB).
"""

from __future__ import annotations

import gc
import ipaddress
import json
import re
from collections.abc import Iterable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixrt.server.common import error_response

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
# Cheap test on the raw body (C speed): only a body that spells a surrogate escape needs the exact check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_MAX_CHILDREN_NAMED = 256  # a bigger container is named as a whole: finding the item would cost a walk


class BodyError(HTTPException):
    """A request refused before validation; FastAPI passes HTTPExceptions from body parsing through."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(status, message)
        self.param, self.code = param, code


def default_allowed_hosts(bound_host: str) -> frozenset[str] | None:
    """On a loopback address: the localhost names and that address. Elsewhere: any (None)."""
    name = bound_host.strip("[]").lower()
    try:
        loopback = ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = name == "localhost"
    return frozenset((*LOCAL_NAMES, name)) if loopback else None


def parse_allowed_hosts(values: Iterable[str]) -> frozenset[str] | None:
    """--allowed-hosts a,b c: names (ports are ignored); "*" allows any host."""
    names = {v.strip().strip("[]").lower() for value in values for v in value.split(",") if v.strip()}
    return None if "*" in names else frozenset(names)


def host_name(header: str) -> str:
    """The name in a Host header: "[::1]:8000" -> "::1", "LocalHost:80" -> "localhost"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class RequestGuard:
    """ASGI middleware: a 400 for a Host header that is not an allowed name, a 413 for a body over
    the limit (an OpenAI error body, as for every error: Starlette's limit answers in plain text)."""

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str] | None, max_body_bytes: int) -> None:
        self.app, self.allowed_hosts, self.max_body_bytes = app, allowed_hosts, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        name = host_name(headers.get("host", ""))
        too_large = BodyError(
            413,
            f"the request body is larger than this server accepts ({self.max_body_bytes:,} bytes; "
            "see --max-request-bytes)",
            None,
            "request_too_large",
        )
        if self.allowed_hosts is not None and name not in self.allowed_hosts:
            message = f"this server does not answer to the host name {ascii(name)} (see --allowed-hosts)"
            await error_response(400, message, None, "host_not_allowed")(scope, receive, send)
            return
        if _declared_length(headers) > self.max_body_bytes:
            await error_response(413, too_large.detail, None, too_large.code)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise too_large  # reading the body fails; FastAPI passes an HTTPException on to its handler
            return message

        await self.app(scope, limited_receive, send)


class JSONRoute(APIRoute):
    """A route whose body must be JSON (415 otherwise) made of valid Unicode text (400 otherwise)."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            if _has_body(request.headers) and not _is_json(request.headers.get("content-type", "")):
                message = "send the body as JSON, with 'Content-Type: application/json'"
                raise BodyError(415, message, None, "unsupported_media_type")
            return await handler(_JSONBodyRequest(request.scope, request.receive))

        return checked


class _JSONBodyRequest(Request):
    async def json(self) -> Any:
        """Called once, by FastAPI, for a body declared JSON."""
        body = await self.body()
        collecting = gc.isenabled()
        gc.disable()
        try:
            value = json.loads(body)  # a JSONDecodeError is FastAPI's 400 "not valid JSON"
        finally:
            if collecting:
                gc.enable()
        if _SURROGATE_ESCAPE.search(body) and not _is_unicode(value):
            path = _bad_path(value)
            raise BodyError(
                400,
                f"{path or 'the request body'} contains a lone UTF-16 surrogate (half of a pair, such as "
                "\\ud800), which is not Unicode text",
                path or None,
                "invalid_unicode",
            )
        return value


def _declared_length(headers: Headers) -> int:
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() else 0


def _has_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _is_unicode(value: Any) -> bool:
    """Whether every string in `value` (keys too) encodes as UTF-8, checked at C speed."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def _bad_path(value: Any) -> str:
    """Where the first non-Unicode string is, as "messages.0.content", descending only through
    containers small enough to search child by child."""
    path: list[str] = []
    while isinstance(value, (dict, list)) and len(value) <= _MAX_CHILDREN_NAMED:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        bad = next(((k, v) for k, v in items if not (_is_unicode(k) and _is_unicode(v))), None)
        if bad is None or not _is_unicode(bad[0]):  # a bad key: name its container
            break
        path.append(str(bad[0]))
        value = bad[1]
    return ".".join(path)
