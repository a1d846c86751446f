"""A preparation process: runs prepare.py on untrusted specs outside the worker, where it can be
killed.

Pure-Python work holds the GIL for as long as it runs, so in a thread it stalls the worker's
step loop (a oneOf of 3,000 consts once stalled every request for 21 s), and a thread cannot be
stopped. A process can: compiler.py gives each compile a time budget and kills the process that
overruns it (or whose requests all left), and the next `prepare` starts a fresh one.

    parent ── "<kind> <nbytes>\\n" + spec ───────────► child stdin
    parent ◄─ "<status> <nbytes>\\n" + text ────────── child's original stdout (its prints go to stderr)
              status: "ok" (text: what the engine compiles), or an errors.py class name (its message);
              a lenient schema's "ok" comes after an "unenforced" frame (a JSON list of pointers)

Plain UTF-8 text both ways; nothing is pickled. The child is exec'd (never a fork of the
torch-laden worker), imports no torch, runs niced below the step loop, and has an address-space
limit (GrammarLimits.memory_mb).
"""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO

from .errors import GrammarError, GrammarTimeout, GrammarTooLarge
from .limits import GrammarLimits
from .prepare import Prepared, prepare

_START_TIMEOUT_S = 60.0  # imports on a loaded machine
_NICENESS = 10  # a compile yields the CPU to the step loop
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding radixrt/
_ERRORS = {cls.__name__: cls for cls in (GrammarError, GrammarTooLarge, GrammarTimeout)}


class PreparationProcessDied(RuntimeError):
    """The process exited mid-request: killed (a cancel, a timeout) or crashed."""


class PreparationProcess:
    """One child process preparing specs for one backend, one at a time. `prepare` is called from
    one thread; `kill` may come from any."""

    def __init__(self, backend: str, preprocess: bool, limits: GrammarLimits) -> None:
        self._command = [sys.executable, "-m", __name__, backend, str(int(preprocess)), json.dumps(asdict(limits))]
        self._proc: subprocess.Popen | None = None
        self._buffer = bytearray()
        self._busy = False  # a request is in flight: only then may kill() stop the process
        self._closed = False
        self._lock = threading.Lock()  # kill() from another thread never races reaping (pid reuse)

    def start(self) -> None:
        """Start a process unless one is running, and wait until it is ready."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
        if self._closed:
            raise PreparationProcessDied("the grammar preparation process was closed")
        path = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path}
        with self._lock:
            self._proc = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                          start_new_session=True)  # no terminal signals: the parent decides
        self._buffer.clear()
        status, _ = self._read_frame(time.monotonic() + _START_TIMEOUT_S)
        if status != "ready":
            raise PreparationProcessDied(f"the grammar preparation process did not start: {status!r}")

    def prepare(self, kind: str, spec: str, deadline: float) -> Prepared:
        """`prepare(kind, spec)` in the process. Raises the GrammarError it raised, TimeoutError
        (after killing it) at `deadline` (time.monotonic()), PreparationProcessDied if it died."""
        self.start()
        data = spec.encode("utf-8", "surrogatepass")
        with self._lock:
            self._busy = True
        try:
            try:
                self._proc.stdin.write(b"%s %d\n" % (kind.encode(), len(data)) + data)
                self._proc.stdin.flush()
            except BrokenPipeError:  # killed while reading the spec
                raise PreparationProcessDied(self._reap()) from None
            status, body = self._read_frame(deadline)
            unenforced: tuple[str, ...] = ()
            if status == "unenforced":
                unenforced = tuple(json.loads(body))
                status, body = self._read_frame(deadline)
        finally:
            with self._lock:
                self._busy = False
        text = body.decode("utf-8", "surrogatepass")
        if status == "ok":
            return Prepared(text, unenforced)
        raise _ERRORS.get(status, GrammarError)(text)

    def kill(self) -> None:
        """Stop the request in flight, if any, by killing the process; the next `prepare` starts a
        fresh one. Between requests it does nothing, so a late cancel cannot hit the next request
        (the caller serializes it with the start of the next one)."""
        with self._lock:
            if self._busy:
                self._kill()

    def close(self) -> None:
        self._closed = True
        if self._proc is not None:
            with self._lock:
                self._kill()
            self._reap()

    def _read_frame(self, deadline: float) -> tuple[str, bytes]:
        while b"\n" not in self._buffer:
            self._fill(deadline)
        header, _, rest = bytes(self._buffer).partition(b"\n")
        status, size = header.decode().split()
        self._buffer[:] = rest
        while len(self._buffer) < int(size):
            self._fill(deadline)
        body = bytes(self._buffer[:int(size)])
        del self._buffer[:int(size)]
        return status, body

    def _fill(self, deadline: float) -> None:
        fd = self._proc.stdout.fileno()
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            with self._lock:
                self._kill()
            self._reap()
            raise TimeoutError
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise PreparationProcessDied(self._reap())
        self._buffer += chunk

    def _kill(self) -> None:
        """SIGKILL, unless reaped already (its pid may belong to another process now). Under _lock."""
        if self._proc.returncode is None:
            self._proc.kill()

    def _reap(self) -> str:
        with self._lock:
            code = self._proc.wait()
        return f"the grammar preparation process exited with code {code}"


# ---- the child ----------------------------------------------------------------------------------
def _serve(backend: str, preprocess: bool, limits: GrammarLimits) -> None:
    os.nice(_NICENESS)
    memory = limits.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # an engine's print must not corrupt the protocol
    requests = sys.stdin.buffer
    _reply(replies, "ready", "")
    while header := requests.readline():
        kind, size = header.decode().split()
        spec = requests.read(int(size)).decode("utf-8", "surrogatepass")
        try:
            prepared = prepare(backend, kind, spec, preprocess, limits)
            if prepared.unenforced:
                _reply(replies, "unenforced", json.dumps(prepared.unenforced))
            _reply(replies, "ok", prepared.text)
        except GrammarError as exc:
            _reply(replies, type(exc).__name__, str(exc))


def _reply(out: BinaryIO, status: str, text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    out.write(b"%s %d\n" % (status.encode(), len(data)) + data)
    out.flush()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2] == "1", GrammarLimits(**json.loads(sys.argv[3])))
