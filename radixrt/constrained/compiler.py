"""Compile grammars away from the step loop and its GIL, within a time budget, cancellably.

    submit(kind, spec) -> a Future for this caller   (over a size limit that needs no parsing: failed at once)
        │
        ▼  one job per distinct (kind, spec), LRU-cached, queued
    runner thread i ── PreparationProcess i   prepare.py: parse, size limits, normalize, check, the
        │                                     engine's text (+ llguidance's validation): Python on
        │                                     untrusted input, so in a process, killable
        ▼  plain text
    build thread ───── backend.build(text)   native; the engines release the GIL (a lenient schema's
                                             dropped keywords ride along to CompiledGrammar.unenforced)
    Both within limits.time_budget_s of the job's start; past it the job fails with
    GrammarTimeout (its process is killed and replaced; a native build is left to finish).

The cache holds jobs, not results: concurrent requests with one spec share one compile, and a
spec that failed fails again at once. Each caller's future is its own: `future.cancel()`
withdraws that caller only; a job nobody waits for any more leaves the queue and the cache, and
if it is being prepared its process is killed.

Setup (the tokenizer, the engine's token tables, the processes) takes seconds: `start()` runs it
on a background thread, so the first constrained request does not stall the step loop. If it
fails, every compile fails with GrammarUnavailable; nothing else is affected.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from .base import CompiledGrammar, GrammarBackend
from .errors import GrammarError, GrammarTimeout, GrammarUnavailable, one_line
from .limits import GrammarLimits
from .prepare import Prepared, check_request
from .sandbox import PreparationProcess, PreparationProcessDied


@dataclass
class CompilerStats:
    hits: int = 0
    misses: int = 0  # compile jobs started
    failures: int = 0  # jobs that ended in an error, timeouts included
    timeouts: int = 0
    cancelled: int = 0  # jobs dropped because every caller cancelled
    refused: int = 0  # refused at submit (unknown kind, over a size limit): no job
    compile_s: float = 0.0  # preparing + building, successful jobs


@dataclass(eq=False)
class _Job:
    kind: str
    spec: str
    callers: list[Future] = field(default_factory=list)
    state: str = "queued"  # -> preparing -> building -> done; or -> cancelled
    process: PreparationProcess | None = None  # while preparing
    outcome: CompiledGrammar | Exception | None = None


class GrammarCompiler:
    """`backend` is a GrammarBackend or a function making one (called on the setup thread)."""

    def __init__(self, backend: GrammarBackend | Callable[[], GrammarBackend], max_workers: int = 2,
                 cache_size: int = 1024, limits: GrammarLimits = GrammarLimits()) -> None:
        self._make_backend = (lambda: backend) if isinstance(backend, GrammarBackend) else backend
        self.cache_size = cache_size
        self.limits = limits
        self.stats = CompilerStats()
        self._workers = max_workers
        self._backend: GrammarBackend | None = None
        self._ready: Future[GrammarBackend] = Future()
        self._started = self._closed = False
        self._unavailable: GrammarUnavailable | None = None
        self._processes: list[PreparationProcess] = []
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._builds = ThreadPoolExecutor(max_workers, thread_name_prefix="grammar-build")
        self._cache: OrderedDict[tuple[str, str], _Job] = OrderedDict()
        self._lock = threading.Lock()

    def start(self) -> "Future[GrammarBackend]":
        """Set up the backend and the preparation processes on a background thread (once; `submit`
        calls it too). The future fails with GrammarUnavailable if setup fails."""
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._setup, name="grammar-setup", daemon=True).start()
        return self._ready

    @property
    def backend(self) -> GrammarBackend:
        """The backend once set up: waits for `start`, raises GrammarUnavailable if it failed."""
        return self.start().result()

    def submit(self, kind: str, spec: str) -> "Future[CompiledGrammar]":
        """A new future of compiling `spec`, for this caller only; the compile itself may be shared
        and may be finished already. Never blocks."""
        future: Future = Future()
        try:
            check_request(kind, spec, self.limits)
        except GrammarError as exc:
            with self._lock:
                self.stats.refused += 1
            future.set_exception(exc)
            return future
        self.start()
        key = (kind, spec)
        with self._lock:
            job = self._cache.get(key)
            if self._unavailable is not None:
                outcome = self._unavailable
            elif job is not None:
                self.stats.hits += 1
                self._cache.move_to_end(key)
                outcome = job.outcome
            else:
                self.stats.misses += 1
                job = self._cache[key] = _Job(kind, spec)
                self._queue.put(job)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)  # a pending job evicted here still completes
                outcome = None
            if outcome is None:
                job.callers.append(future)
        if outcome is not None:
            _settle(future, outcome)
        else:
            future.add_done_callback(partial(self._withdraw, job))
        return future

    def compile(self, kind: str, spec: str) -> CompiledGrammar:
        """Blocking convenience for tests and offline use (not for the step loop)."""
        return self.submit(kind, spec).result()

    def __len__(self) -> int:
        return len(self._cache)

    def shutdown(self) -> None:
        """Stop the processes; futures still waiting are cancelled."""
        with self._lock:
            self._closed = True
            jobs, self._cache = list(self._cache.values()), OrderedDict()
        for _ in range(self._workers):
            self._queue.put(None)
        for job in jobs:
            for future in list(job.callers):
                future.cancel()
        for process in self._processes:
            process.close()
        self._builds.shutdown(wait=False, cancel_futures=True)

    # ---- the setup thread ---------------------------------------------------------------------
    def _setup(self) -> None:
        try:
            backend = self._make_backend()
            self._processes = [PreparationProcess(backend.name, backend.preprocess, self.limits)
                               for _ in range(self._workers)]
            for process in self._processes:
                process.start()
        except Exception as exc:  # no tokenizer, no engine package, no process: no constrained decoding
            error = GrammarUnavailable(f"constrained decoding unavailable: {one_line(exc)}")
            with self._lock:
                self._unavailable = error
            while not self._queue.empty():
                job = self._queue.get()
                if job is not None:
                    self._finish(job, error, 0.0)
            self._ready.set_exception(error)
            return
        self._backend = backend
        for process in self._processes:
            threading.Thread(target=self._run, args=(process,), name="grammar-prepare", daemon=True).start()
        self._ready.set_result(backend)

    # ---- the runner threads, one per process ----------------------------------------------------
    def _run(self, process: PreparationProcess) -> None:
        while (job := self._queue.get()) is not None and not self._closed:
            with self._lock:
                if job.state == "cancelled":
                    continue
                job.state, job.process = "preparing", process
            start = time.monotonic()
            deadline = start + self.limits.time_budget_s
            try:
                prepared = process.prepare(job.kind, job.spec, deadline)
                with self._lock:
                    if job.state == "cancelled":
                        continue
                    job.state, job.process = "building", None
                outcome = self._build(job, prepared, deadline)
            except TimeoutError:
                outcome = GrammarTimeout(f"{job.kind}: compiling took longer than the limit of "
                                         f"{self.limits.time_budget_s:g} s (time_budget_s)")
            except PreparationProcessDied as exc:  # a crash (a cancel is ignored by _finish)
                outcome = GrammarError(f"{job.kind}: {exc}")
            except GrammarError as exc:
                outcome = exc
            except Exception as exc:  # e.g. no process could be started: fail this job, keep the runner
                outcome = GrammarError(f"{job.kind}: could not prepare it: {one_line(exc)}")
            self._finish(job, outcome, time.monotonic() - start)

    def _build(self, job: _Job, prepared: Prepared, deadline: float) -> CompiledGrammar:
        """The native build on a thread of its own, awaited until the deadline. It cannot be
        interrupted: one past the deadline finishes in the background, its result dropped."""
        try:
            build = self._builds.submit(self._backend.build, job.kind, job.spec, prepared)
            return build.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            build.cancel()  # if it never started
            raise
        except GrammarError:
            raise
        except Exception as exc:  # an engine bug must still reach the request as a clean error
            raise GrammarError(f"{self._backend.name}: failed to compile {job.kind}: {one_line(exc)}") from exc

    def _finish(self, job: _Job, outcome: CompiledGrammar | Exception, seconds: float) -> None:
        with self._lock:
            if job.state in ("cancelled", "done"):
                return
            job.state, job.process, job.outcome = "done", None, outcome
            callers, job.callers = job.callers, []
            if isinstance(outcome, BaseException):
                self.stats.failures += 1
                self.stats.timeouts += isinstance(outcome, GrammarTimeout)
            else:
                self.stats.compile_s += seconds
        for future in callers:
            _settle(future, outcome)

    # ---- cancellation -------------------------------------------------------------------------
    def _withdraw(self, job: _Job, future: Future) -> None:
        """A caller's future is done; if it was cancelled and nobody else waits, drop the job."""
        if not future.cancelled():
            return
        with self._lock:
            if future in job.callers:
                job.callers.remove(future)
            if job.callers or job.state in ("done", "cancelled"):
                return
            if job.state == "preparing":
                job.process.kill()  # under the lock: the runner cannot have moved on to another job
            job.state = "cancelled"
            self.stats.cancelled += 1
            if self._cache.get((job.kind, job.spec)) is job:
                del self._cache[(job.kind, job.spec)]


def _settle(future: Future, outcome: CompiledGrammar | BaseException) -> None:
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:  # cancelled meanwhile
        pass
