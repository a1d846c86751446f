"""`radixrt serve`: flags and the uvicorn run (SIGTERM/SIGINT drain in-flight requests, then stop)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable

from radixrt.server.data_parallel import add_data_parallel_args
from radixrt.server.settings import REASONING_PARSERS, TOOL_CALL_PARSERS, ServerSettings

log = logging.getLogger(__name__)

DEFAULT_PORT = 30000  # SGLang's default
# After --drain-timeout the requests still running end with a 503 (an error event on a stream);
# uvicorn gets this much longer to send those before it cuts the connections itself.
DRAIN_GRACE = 5.0


def _drained_server(drain_timeout: float, cut_requests: Callable[[], None]):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so a drained stop would
        exit with -15; once every request has finished, that stop is a clean exit (status 0).
        Requests still running at the drain deadline are ended by the server (`cut_requests`),
        so a stream gets an error event and `[DONE]`, not a connection cut in the middle of a chunk."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    getattr(self, "_captured_signals", []).clear()

        async def shutdown(self, sockets=None) -> None:
            deadline = asyncio.get_running_loop().call_later(drain_timeout, cut_requests)
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

    return Server


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, local only)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    g.add_argument(
        "--api-key",
        default=os.environ.get("RADIXRT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $RADIXRT_API_KEY)",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the model id /v1/models lists and clients send; 'default' and the model path are accepted too "
        "(default: the --model path as given, as in SGLang)",
    )
    g.add_argument(
        "--enable-metrics",
        action="store_true",
        help="SGLang's flag, accepted: /metrics is always on (SGLang's metric names; no API key needed)",
    )
    g.add_argument(
        "--tool-call-parser",
        default=None,
        choices=TOOL_CALL_PARSERS,
        help="SGLang's name of the model's tool-call format (default: radixrt's own tool-call handling)",
    )
    g.add_argument(
        "--reasoning-parser",
        default=None,
        choices=REASONING_PARSERS,
        help="SGLang's name of the model's reasoning format: its reasoning goes to reasoning_content "
        "(default: none, reasoning stays in the content)",
    )
    g.add_argument(
        "--no-restart-worker",
        dest="restart_worker",
        action="store_false",
        help="exit non-zero when the worker process dies instead of restarting it",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds to let requests finish on shutdown; those still running then end with a 503 "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=None,
        metavar="HOST",
        help="Host header names to answer, '*' for any (default: on a loopback address, the localhost "
        "names and that address; elsewhere any)",
    )
    d = ServerSettings()
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=d.max_request_bytes,
        help="larger request bodies get a 413 (default: %(default)s, 4 MiB)",
    )
    g.add_argument(
        "--max-prompt-chars",
        type=int,
        default=d.max_prompt_chars,
        help="longer prompt text is refused before tokenizing (default: twice what could fit the context)",
    )
    g.add_argument(
        "--max-stop-strings",
        type=int,
        default=d.max_stop_strings,
        help="stop strings (and stop token ids) per prompt (default: %(default)s)",
    )
    g.add_argument(
        "--max-stop-chars", type=int, default=d.max_stop_chars, help="characters per stop string (default: %(default)s)"
    )
    add_data_parallel_args(parser)


def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT; return the process exit code."""
    import uvicorn

    from radixrt.engine_args import check_engine_config, engine_config
    from radixrt.frontend.errors import WorkerUnavailable
    from radixrt.server.app import build_app
    from radixrt.server.guard import default_allowed_hosts, parse_allowed_hosts

    config = engine_config(args)
    check_engine_config(config)  # a bad --chat-template or --mem-fraction-static: one line, before any work
    hosts = default_allowed_hosts(args.host) if args.allowed_hosts is None else parse_allowed_hosts(args.allowed_hosts)
    settings = ServerSettings(
        api_key=args.api_key or None,
        served_model_name=args.served_model_name,
        restart_worker=args.restart_worker,
        max_request_bytes=args.max_request_bytes,
        max_stop_strings=args.max_stop_strings,
        max_stop_chars=args.max_stop_chars,
        max_prompt_chars=args.max_prompt_chars,
        allowed_hosts=hosts,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    if args.dp_size > 1:  # this server's replicas behind sglang-router (server/data_parallel.py)
        from radixrt.engine_args import add_engine_args
        from radixrt.server.data_parallel import serve_data_parallel

        parser = argparse.ArgumentParser()
        add_server_args(parser)
        add_engine_args(parser)
        return serve_data_parallel(args, parser)
    fatal = []

    def on_fatal() -> None:
        fatal.append(True)
        server.should_exit = True

    def on_ready(name: str) -> None:
        print(f"radixrt: serving {name} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)

    def cut_requests() -> None:
        cut = app.state.rt.manager.fail_all(WorkerUnavailable("the server is shutting down (--drain-timeout passed)"))
        if cut:
            log.warning("--drain-timeout (%g s) passed: ended %d request(s) still running", args.drain_timeout, cut)

    app = build_app(config, settings, on_fatal, on_ready)
    server = _drained_server(args.drain_timeout, cut_requests)(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
            timeout_graceful_shutdown=args.drain_timeout + DRAIN_GRACE,
            access_log=False,
        )
    )
    server.run()
    if not server.started:
        return 3  # the worker (or the socket) failed to start: the reason is logged above
    return 1 if fatal else 0
