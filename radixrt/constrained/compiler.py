"""Compile grammars off the step loop: a thread pool and an LRU cache of futures.

The cache holds the *future*, not the result, so concurrent requests with the same spec share
one compilation, and a spec that failed fails again at once (the future holds the
GrammarError) instead of being recompiled by every retry. The scheduler keeps a waiting
request out of the batch until `future.done()`; it never blocks on `result()`.

All three engines release the GIL while they compile (measured in docs/constrained.md), so a
compile in the pool does not stall the step loop's Python code.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .base import CompiledGrammar, GrammarBackend, GrammarError


@dataclass
class CompilerStats:
    hits: int = 0
    misses: int = 0
    failures: int = 0
    compile_s: float = 0.0  # total time spent compiling (successes)


class GrammarCompiler:
    def __init__(self, backend: GrammarBackend, max_workers: int = 2, cache_size: int = 1024) -> None:
        self.backend = backend
        self.cache_size = cache_size
        self.stats = CompilerStats()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, kind: str, spec: str) -> "Future[CompiledGrammar]":
        """The (possibly shared, possibly finished) future of compiling `spec`. Never blocks.

        Do not cancel it: other requests may be waiting on the same future.
        """
        key = (kind, spec)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                self.stats.hits += 1
                return future
            self.stats.misses += 1
            future = self._pool.submit(self._compile, kind, spec)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)  # a pending future evicted here still completes
        return future

    def compile(self, kind: str, spec: str) -> CompiledGrammar:
        """Blocking convenience for tests and offline use (not for the step loop)."""
        return self.submit(kind, spec).result()

    def _compile(self, kind: str, spec: str) -> CompiledGrammar:
        try:
            compiled = self.backend.compile(kind, spec)
        except GrammarError:
            self._count(failed=True)
            raise
        except Exception as exc:  # an engine bug must still reach the request as a clean error
            self._count(failed=True)
            raise GrammarError(f"{self.backend.name}: failed to compile {kind}: {exc}") from exc
        self._count(failed=False, seconds=compiled.compile_s)
        return compiled

    def _count(self, failed: bool, seconds: float = 0.0) -> None:
        with self._lock:
            self.stats.failures += failed
            self.stats.compile_s += seconds

    def __len__(self) -> int:
        return len(self._cache)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
