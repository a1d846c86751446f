"""A live `radixrt serve` in a subprocess for the end-to-end tests (shared by every server test)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

KEY = "sk-test-key"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: str

    def get(self, path: str, timeout: float = 30) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)

    def post(self, path: str, body=None, timeout: float = 60) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)

    def stats(self) -> dict:
        return self.get("/stats").json()

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Aborts reach the worker asynchronously: wait until nothing runs or waits."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if (s["num_running"] == s["num_waiting"] == 0) or time.monotonic() > deadline:
                return s
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"server not healthy after {timeout} s:\n{Path(log).read_text()[-3000:] if log else ''}")


@contextlib.contextmanager
def running_server(*args: str, model: Path | None = None, api_key: str | None = KEY):
    """`radixrt serve` in a subprocess on a free port; SIGTERM (then kill) on exit."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="radixrt-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "radixrt.cli", "--log-level", "INFO", "serve", "--port", str(port), *args]
    if model is not None:
        cmd += ["--model", str(model)]
    if api_key:
        cmd += ["--api-key", api_key]
    env = dict(os.environ, PYTHONPATH=str(ROOT), RADIXRT_API_KEY="")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log=log.name)
        yield Server(url, proc, log.name)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        text = Path(log.name).read_text()
        errors = text.find("Traceback")
        print(text[errors : errors + 4000] if errors >= 0 else "", text[-4000:])  # pytest shows it for a failure
        os.unlink(log.name)


TINY_ARGS = ("--page-size", "4", "--num-threads", "1", "--chunked-prefill-size", "64")
