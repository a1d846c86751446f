"""`radixrt serve`: flags and the uvicorn run (SIGTERM/SIGINT drain in-flight requests, then stop)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

log = logging.getLogger(__name__)

DEFAULT_PORT = 30000  # SGLang's default


def _quiet_signals_server():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so a drained stop would
        exit with -15; once every request has finished, that stop is a clean exit (status 0)."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    getattr(self, "_captured_signals", []).clear()

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
    g.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
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
        help="seconds to let requests finish on shutdown (default: %(default)s)",
    )


def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT; return the process exit code."""
    import uvicorn

    from radixrt.engine_args import engine_config
    from radixrt.server.app import build_app
    from radixrt.server.common import ServerSettings

    config = engine_config(args)
    settings = ServerSettings(args.api_key or None, args.served_model_name, args.restart_worker)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    fatal = []

    def on_fatal() -> None:
        fatal.append(True)
        server.should_exit = True

    def on_ready(name: str) -> None:
        print(f"radixrt: serving {name} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)

    app = build_app(config, settings, on_fatal, on_ready)
    server = _quiet_signals_server()(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
            timeout_graceful_shutdown=args.drain_timeout,
            access_log=False,
        )
    )
    server.run()
    if not server.started:
        return 3  # the worker (or the socket) failed to start: the reason is logged above
    return 1 if fatal else 0
