"""Runtime: start `radixrt serve` as a child process on a free port, talk to it, stop it.

    runtime = Runtime(model_path=None, kv_memory_gb=2)   # keyword args -> `--kv-memory-gb 2`
    set_default_backend(runtime)                          # programs go to runtime.endpoint
    runtime.shutdown()                                    # also at interpreter exit
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

from radixrt.lang.backend.runtime_endpoint import RuntimeEndpoint
from radixrt.lang.errors import BackendError


class Runtime:
    def __init__(
        self,
        model_path: str | None = None,
        log_level: str = "error",
        launch_timeout: float = 300.0,
        port: int | None = None,
        api_key: str | None = None,
        **server_args: Any,
    ) -> None:
        """`server_args` are `radixrt serve` flags by their Python names (`chunked_prefill_size=256`)."""
        model = server_args.pop("model", None) or model_path
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.generate_url = self.url + "/generate"
        self.api_key = api_key
        self.endpoint: RuntimeEndpoint | None = None
        self.process_rc: int | None = None
        cmd = [sys.executable, "-m", "radixrt.cli", "--log-level", log_level, "serve", "--port", str(self.port)]
        if model:
            cmd += ["--model", str(model)]
        cmd += _flags(server_args)
        env = dict(os.environ)
        if api_key:
            env["RADIXRT_API_KEY"] = api_key
        self._log = tempfile.TemporaryFile()
        self.process: subprocess.Popen | None = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        atexit.register(self.shutdown)
        self._wait_until_healthy(launch_timeout)
        self.endpoint = RuntimeEndpoint(self.url, api_key=api_key)

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.process.poll()
            if rc is not None:
                output = self._output()
                self.shutdown()
                raise BackendError(f"the radixrt server exited with code {rc} while starting:\n{output}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        output = self._output()
        self.shutdown()
        raise TimeoutError(f"the radixrt server did not become healthy within {timeout:.0f} s:\n{output}")

    def _output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def shutdown(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s). Safe to call twice."""
        proc, self.process = self.process, None
        if proc is None:
            return
        self.process_rc = proc.poll()
        if self.process_rc is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                self.process_rc = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                self.process_rc = proc.wait()
            except ProcessLookupError:
                self.process_rc = proc.wait()
        if self.endpoint is not None:
            self.endpoint.shutdown()

    def cache_prefix(self, prefix: str) -> None:
        self.endpoint.cache_prefix(prefix)

    def get_tokenizer(self):
        return self.endpoint.tokenizer

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flags(args: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out
