"""`radixrt serve --dp N`: N replicas of the server behind sglang-router, and their supervision.

Each replica is a whole `radixrt serve` (front end, worker, its own radix cache) on a loopback port
with its share of the threads, pinned to its share of the cores; sglang-router listens on the
serving address and spreads requests over them. Its `cache_aware` policy sends a request to the
replica whose cache most likely holds its prefix, which is what keeps a conversation on one replica.

This process only supervises, on one thread: it starts the replicas, waits until each is healthy,
starts the router, then restarts any child that dies (the router routes around a dead replica
meanwhile: it retries a failed request on another one and its health checks mark the replica down).
SIGTERM/SIGINT stop the router first, which finishes the requests it holds, then the replicas.
Every child gets SIGTERM if this process dies (PR_SET_PDEATHSIG), so none outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

ROUTER_POLICIES = ("cache_aware", "round_robin", "power_of_two", "random", "manual")  # sglang-router's names
STARTUP_TIMEOUT = 1800.0  # s for a replica to turn healthy (the router's own default for its workers)
MAX_RESTART_DELAY = 30.0  # s; a child that keeps dying at once is restarted after 1, 2, 4 ... s, then this
STABLE_AFTER = 60.0  # s up after which a child's next death counts as its first again
# How the router notices a dead replica. Its circuit breaker opens on the first failed call (connection
# refused, a 5xx; not a 4xx), so the retry of that request goes to another replica: with its default
# of 10 failures, cache_aware retried the same dead replica 5 times and the request failed. The breaker
# lets a request through again after 10 s. Health checks mark the replica down within ~2 x 2 s (its
# state in the router's /workers) and up again after one good check once it is restarted.
ROUTER_HEALTH = ["--cb-failure-threshold", "1", "--cb-timeout-duration-secs", "10",
                 "--health-check-interval-secs", "2", "--health-failure-threshold", "2",
                 "--health-success-threshold", "1"]  # fmt: skip
# Runs the router with the API key from the environment, so that it is not on a command line others can read.
ROUTER_MAIN = (
    "import os, sys; from sglang_router.launch_router import main; "
    "key = os.environ.pop('RADIXRT_ROUTER_API_KEY', ''); sys.argv += ['--api-key', key] if key else []; main()"
)
# Set per replica (or not at all) by this process, never passed through as given.
SUPERVISOR_DESTS = {"host", "port", "api_key", "allowed_hosts", "num_threads", "kv_disk_dir",
                    "dp_size", "router_policy"}  # fmt: skip
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def add_data_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data parallel (docs/scaling.md)")
    g.add_argument(
        "--dp",
        "--dp-size",
        "--data-parallel-size",
        dest="dp_size",
        type=int,
        default=1,
        help="replicas behind sglang-router, each with its share of --num-threads (default: %(default)s)",
    )
    g.add_argument(
        "--router-policy",
        default="cache_aware",
        choices=ROUTER_POLICIES,
        help="sglang-router's policy with --dp > 1 (default: %(default)s)",
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def replica_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: set[str]) -> list[str]:
    """The command-line flags that give `args` back through `parser`, leaving out the `skip` dests
    and every flag at its default (so a replica parses exactly the options this server was given)."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip | {"help"}:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def core_shares(dp: int, threads: int) -> list[list[int] | None]:
    """The cores each replica is pinned to: `threads` of this process's cores each, when they go round;
    otherwise no pinning (replicas sharing cores would only be kept off the idle ones)."""
    cores = sorted(os.sched_getaffinity(0))
    if threads * dp > len(cores):
        return [None] * dp
    return [cores[i * threads : (i + 1) * threads] for i in range(dp)]


class Child:
    """One supervised process (a replica or the router), restarted with a growing delay if it dies."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        health_url: str,
        cores: list[int] | None = None,
        ready: Callable[[dict], bool] | None = None,  # on the health answer's JSON; None: a 200 is enough
    ) -> None:
        self.name, self.argv, self.env, self.health_url = name, argv, env, health_url
        self.cores, self.ready = cores, ready
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.failures = 0  # deaths in a row, each within STABLE_AFTER of its start
        self.restart_at: float | None = None
        self.healthy = False

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True, preexec_fn=self._in_child)
        self.started, self.restart_at, self.healthy = time.monotonic(), None, False

    def _in_child(self) -> None:
        """Runs in the child between fork and exec (this process has one thread: nothing is locked)."""
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if self.cores:
            os.sched_setaffinity(0, self.cores)

    def check_health(self) -> bool:
        """Poll /health once (until it first answers 200 after a start); log the recovery after a restart."""
        if not self.healthy and self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                with urllib.request.urlopen(self.health_url, timeout=2) as r:
                    self.healthy = r.status == 200 and (self.ready is None or self.ready(json.load(r)))
            if self.healthy and self.failures:
                log.warning("%s (pid %d) is healthy again", self.name, self.proc.pid)
        return self.healthy

    def watch(self) -> None:
        """Notice a death (log it, schedule the restart) and restart when that time comes."""
        now = time.monotonic()
        if self.restart_at is None and self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            self.failures = 1 if now - self.started > STABLE_AFTER else self.failures + 1
            delay = min(MAX_RESTART_DELAY, 2.0 ** (self.failures - 1))
            log.error("%s (pid %d) %s; restarting it in %g s", self.name, self.proc.pid, how, delay)
            self.restart_at, self.healthy = now + delay, False
        if self.restart_at is not None and now >= self.restart_at:
            self.start()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop within %g s; killing it", self.name, self.proc.pid, timeout)
            self.proc.kill()
            self.proc.wait()


def _router_log_level(level: str) -> str:
    """The router's name for our --log-level (it knows debug, info, warn, error)."""
    return {"DEBUG": "debug", "INFO": "info", "WARNING": "warn"}.get(level.upper(), "error")


class DataParallelServer:
    """`args.dp_size` replicas and the router, from the parsed `radixrt serve` flags."""

    def __init__(self, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
        self.args = args
        dp = args.dp_size
        threads = args.num_threads or len(os.sched_getaffinity(0))
        share = max(1, threads // dp)
        if threads < dp:
            log.warning("%d threads for %d replicas: each replica gets 1", threads, dp)
        shared = replica_flags(parser, args, SUPERVISOR_DESTS)
        env = dict(os.environ, RADIXRT_API_KEY=args.api_key or "")  # not on the command line
        level = getattr(args, "log_level", "WARNING")
        cores = core_shares(dp, share) if args.device == "cpu" else [None] * dp
        self.replicas = []
        for i in range(dp):
            port = free_port()
            argv = [sys.executable, "-m", "radixrt.cli", "--log-level", level, "serve", "--host", "127.0.0.1",
                    "--port", str(port), "--num-threads", str(share), *shared, *_disk_tier(args, i)]  # fmt: skip
            name = f"replica {i} on port {port}"
            self.replicas.append(Child(name, argv, env, f"http://127.0.0.1:{port}/health", cores[i]))
        urls = [r.health_url.removesuffix("/health") for r in self.replicas]
        metrics = free_port()
        log.info("sglang-router's Prometheus metrics: http://127.0.0.1:%d/metrics", metrics)
        router_argv = [sys.executable, "-c", ROUTER_MAIN, "--host", args.host, "--port", str(args.port),
                       "--worker-urls", *urls, "--policy", args.router_policy,
                       "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics),
                       "--shutdown-grace-period-secs", str(int(args.drain_timeout)),
                       "--log-level", _router_log_level(level), *ROUTER_HEALTH]  # fmt: skip
        router_env = dict(os.environ, RADIXRT_ROUTER_API_KEY=args.api_key or "")
        readiness = f"http://{_connect_host(args.host)}:{args.port}/readiness"
        self.router = Child("sglang-router", router_argv, router_env, readiness,
                            ready=lambda answer: answer.get("healthy_workers") == dp)  # fmt: skip
        self.stopping = False

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit code: 0 after a stop, 3 when the start failed."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        children = [*self.replicas, self.router]
        try:
            for r in self.replicas:
                r.start()
            if not self._wait_healthy(self.replicas) or not self._start_router():
                return 0 if self.stopping else 3
            print(f"radixrt: serving {self._model_name()} on http://{self.args.host}:{self.args.port} "
                  f"({len(self.replicas)} replicas behind sglang-router, policy {self.args.router_policy})",
                  file=sys.stderr, flush=True)  # fmt: skip
            while not self.stopping:
                for child in children:
                    child.watch()
                    child.check_health()
                time.sleep(0.5)
            return 0
        finally:
            self._shutdown()

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _wait_healthy(self, children: list[Child]) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self.stopping:
            dead = [c for c in children if c.proc is not None and c.proc.poll() is not None]
            if dead:
                log.error("%s exited with status %s while starting", dead[0].name, dead[0].proc.returncode)
                return False
            if all([c.check_health() for c in children]):
                return True
            if time.monotonic() > deadline:
                log.error("not healthy after %g s: %s", STARTUP_TIMEOUT, ", ".join(c.name for c in children))
                return False
            time.sleep(0.25)
        return False

    def _start_router(self) -> bool:
        self.router.start()
        return self._wait_healthy([self.router])

    def _model_name(self) -> str:
        request = urllib.request.Request(self.replicas[0].health_url.replace("/health", "/get_model_info"))
        if self.args.api_key:
            request.add_header("Authorization", f"Bearer {self.args.api_key}")
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError, KeyError):
            with urllib.request.urlopen(request, timeout=5) as r:
                return json.load(r)["served_model_name"]
        return "the model"

    def _shutdown(self) -> None:
        """The router first (it finishes the requests it holds, up to --drain-timeout), then the replicas."""
        grace = self.args.drain_timeout + 10
        self.router.terminate()
        self.router.wait(grace)
        for r in self.replicas:
            r.terminate()
        for r in self.replicas:
            r.wait(grace)


def _disk_tier(args: argparse.Namespace, replica: int) -> list[str]:
    """A folder of its own in the disk tier's for each replica: a tier serves one process (it is flock'ed)."""
    if not (args.kv_disk_dir or args.enable_hierarchical_cache):
        return []
    from radixrt.model.loader import default_cache_dir

    return ["--kv-disk-dir", str(Path(args.kv_disk_dir or default_cache_dir() / "kv") / f"replica-{replica}")]


def _connect_host(host: str) -> str:
    """Where this process reaches a server listening on `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def serve_data_parallel(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if importlib.util.find_spec("sglang_router") is None:
        print("radixrt: error: --dp needs sglang-router: pip install 'radixrt[router]'", file=sys.stderr)
        return 2
    return DataParallelServer(args, parser).run()
