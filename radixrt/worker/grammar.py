"""The worker's side of constrained decoding: compile off the step loop, mask, accept, jump forward.

The grammar engine is set up in the background when the worker starts (constrained/compiler.py:
seconds of tokenizer tables), so the first constrained request does not stall a step. A request
with a grammar waits outside the scheduler while its spec compiles in the compiler's processes
(`compiling`: request -> future), within a time and size budget; a request that finishes or is
aborted first cancels its compile. Once compiled, `req.grammar` holds its matcher. Each step, the
constrained rows of the sampling batch get one packed bitmask; the other rows are never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait

import torch

from radixrt.constrained import get_backend
from radixrt.constrained.bitmask import allocate_bitmask
from radixrt.constrained.compiler import GrammarCompiler
from radixrt.constrained.limits import GrammarLimits
from radixrt.request import Req


class RequestGrammars:
    def __init__(
        self,
        backend_name: str,
        tokenizer_loader: Callable,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        limits: GrammarLimits,
    ) -> None:
        self.vocab_size = vocab_size

        def make_backend():  # runs on the compiler's setup thread
            return get_backend(backend_name, tokenizer_loader(), vocab_size, stop_token_ids=list(stop_token_ids))

        self.compiler = GrammarCompiler(make_backend, limits=limits)
        self.compiler.start()
        self.compiling: dict[Req, Future] = {}

    def submit(self, req: Req) -> None:
        """Start compiling req's grammar (never blocks: errors arrive through `poll`)."""
        kind, spec = req.params.grammar_spec
        self.compiling[req] = self.compiler.submit(kind, spec)

    def discard(self, req: Req) -> None:
        """Forget a request that finished or was aborted, cancelling its compile if it still waits."""
        future = self.compiling.pop(req, None)
        if future is not None:
            future.cancel()

    def poll(self) -> tuple[list[Req], list[tuple[Req, Exception]]]:
        """Requests whose grammar finished compiling: (ready, failed with the error). An error's
        `http_status` says why: 400 invalid, 408 over the time budget, 413 too large, 400 no engine for this model."""
        ready, failed = [], []
        for req, future in [(r, f) for r, f in self.compiling.items() if f.done()]:
            del self.compiling[req]
            error = future.exception()
            if error is not None:
                failed.append((req, error))
            else:
                compiled = future.result()
                req.grammar = self.compiler.backend.matcher(compiled)
                req.grammar_unenforced = compiled.unenforced
                ready.append(req)
        return ready, failed

    def wait(self, timeout: float) -> None:
        """Block until a compile finishes (or timeout): the idle step loop must not spin."""
        if self.compiling:
            wait(list(self.compiling.values()), timeout=timeout, return_when=FIRST_COMPLETED)

    def bitmask(
        self, reqs: Sequence[Req], drafts: Sequence[Sequence[int]] | None = None
    ) -> tuple[torch.Tensor, list[int]] | None:
        """One packed mask for the step's sampling rows and the indices of the constrained ones.

        With drafts (speculative decoding), request i has 1 + len(drafts[i]) rows, row j masked as
        if drafts[i][:j] were accepted: the matcher steps over the drafts and rolls back.
        """
        drafts = drafts or [()] * len(reqs)
        if all(r.grammar is None for r in reqs):
            return None
        mask = allocate_bitmask(sum(1 + len(d) for d in drafts), self.vocab_size)
        rows, row = [], 0
        for req, draft in zip(reqs, drafts):
            if req.grammar is not None:
                for j in range(len(draft) + 1):
                    req.grammar.fill_bitmask(mask, row + j)
                    if j < len(draft):
                        req.grammar.accept_token(draft[j])  # valid: cut by valid_drafts
                req.grammar.rollback(len(draft))
                rows.extend(range(row, row + len(draft) + 1))
            row += len(draft) + 1
        return mask, rows

    def valid_drafts(self, req: Req, draft: Sequence[int]) -> int:
        """How many leading draft tokens req's grammar accepts (its state is left unchanged)."""
        n = 0
        while n < len(draft) and req.grammar.accept_token(draft[n]):
            n += 1
        req.grammar.rollback(n)
        return n

    def jump_forward(self, req: Req, budget: int) -> list[int]:
        """Tokens of the text the grammar forces next (already accepted), or [] when there is a choice.

        The forced text is tokenized on its own: the tokens already generated were streamed
        to the client, so they are not re-tokenized across the boundary. Its last token is left
        for the model to sample: it may merge with what follows (`"a": ` ends in a lone " ",
        where the model would write ' "' or ' true'), and a dangling " " made SmolLM2 answer
        with numbers (83 of 216 corpus outputs changed; none with the last token held back).
        """
        forced = req.grammar.find_jump_forward()
        if not forced or budget <= 1:
            return []
        ids = self.compiler.backend.tokenizer.encode(forced, add_special_tokens=False)[:-1][
            : budget - 1
        ]  # the last token: see above
        for n, token in enumerate(ids):
            if not req.grammar.accept_token(token):
                req.grammar.rollback(n)
                return []
        return ids

    def close(self) -> None:
        self.compiler.shutdown()
