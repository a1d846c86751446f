"""A request's CPU-heavy preparation: bounded first, off the event loop, dropped when its client leaves.

One event loop serves every client, so whatever a handler computes, everyone else waits for.
What a request carries sets the cost of preparing it: the chat template (Python, grows with the
messages and tools), the tokenizer (Rust, grows with the characters), the stop-string automaton
(Python, grows with the stop characters). So:

- every input is bounded before any work (--max-request-bytes, prompt text longer than could
  fit the context, --max-stop-strings, --max-stop-chars) and refused with a 4xx naming the field;
- small work (up to INLINE_CHARS characters of input, about a millisecond) runs inline, cheaper
  than a thread hop, so a cheap request never queues behind an expensive one;
- the rest runs on a few preparation threads. The tokenizer's encode releases the GIL, and the
  template's Python gives it up every few milliseconds (`sys.getswitchinterval`), so the loop
  keeps serving meanwhile. The threads share the one tokenizer: safe as long as nothing sets
  truncation or padding on it (transformers would then reconfigure the Rust tokenizer during
  encodes, which fails with "Already borrowed" when two threads encode at once);
- when the client leaves, the handler returns at once: work still queued is dropped, work
  already running (bounded) finishes and is discarded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fastapi import Request

from radixrt.frontend.detokenizer import StopRules
from radixrt.frontend.errors import RequestError
from radixrt.sampling_params import SamplingParams
from radixrt.server.disconnect import unless_disconnected
from radixrt.server.settings import ServerSettings

T = TypeVar("T")

INLINE_CHARS = 4096  # ~1 ms to tokenize or to build an automaton from, on our CPU
PREPARE_THREADS = 2


class Preparer:
    def __init__(self, settings: ServerSettings, threads: int = PREPARE_THREADS) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="radixrt-prepare")

    async def run(self, request: Request, size: int, work: Callable[[], T]) -> T:
        """`work()`, which reads about `size` characters of input: inline if small, else on a thread."""
        if size <= INLINE_CHARS:
            return work()
        return await unless_disconnected(request, asyncio.get_running_loop().run_in_executor(self._pool, work))

    async def stops(self, request: Request, params: list[SamplingParams], param: str) -> list[StopRules]:
        """The stop-string automaton and compiled stop regexes of each params, one per distinct pair
        of lists (n choices share theirs).

        Each list was checked against the limits already (`make_params`); a request whose distinct
        lists hold more characters in all than one list may (a batch with different stops per
        prompt) is refused, so no request builds more than one full-size automaton's worth (and
        one full list of regexes).
        """
        key = lambda p: (tuple(p.stop), tuple(p.stop_regex))  # noqa: E731
        distinct = {key(p) for p in params}
        max_chars = self.settings.max_stop_strings * self.settings.max_stop_chars
        for k, name in ((0, param), (1, f"{param}_regex")):
            size = sum(len(s) for lists in distinct for s in lists[k])
            if size > max_chars:
                raise RequestError(
                    f"{name}: the prompts of this request carry {size:,} characters of them in all; "
                    f"at most {max_chars:,} (--max-stop-strings x --max-stop-chars)",
                    400,
                    name,
                )

        def build() -> list[StopRules]:
            built = {(s, r): StopRules.build(SamplingParams(stop=list(s), stop_regex=list(r))) for s, r in distinct}
            return [built[key(p)] for p in params]

        return await self.run(request, sum(len(s) for lists in distinct for group in lists for s in group), build)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
