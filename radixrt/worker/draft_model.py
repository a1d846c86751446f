"""A draft model: a smaller model with the same tokenizer proposes k tokens, one forward per token.

It has its own `ModelRunner`, whose KV pool has as many pages as the target's and is addressed by
the same page ids. So the worker's allocator, page tables, prefix cache, preemption and page
accounting serve both models: page p of the draft pool holds the draft's K/V of the tokens page p
holds in the target pool, and the draft needs no allocator, tree or scheduler of its own.

The draft computes each prefill chunk in the step the target does (`prefill`, as SGLang's draft
extend), so its prompt K/V is there before the first decode step and in every page the prefix cache
publishes. Its K/V is only ever a hint: every draft token is verified by the target, so a stale page
(loaded from disk, or past where the draft stopped while speculation was off) costs acceptance, never
correctness. Per request the draft tracks how many leading positions it computed (a new request
trusts its cached prefix), and the first draft forward of a step catches up the rest::

    positions:    c ......... n | n+1  n+2 ... n+k-1        n: the last kept token; c: draft's computed
    draft fwd 1: [catch-up ... t]                      -> d1
    draft fwd 2..k:              [d1] [d2] ... [d_k-1]  -> d2 .. dk   (positions n+1 .. n+k-1: reserved)
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence

import torch

from radixrt.config import EngineConfig
from radixrt.model.loader import resolve_model_path
from radixrt.request import Req
from radixrt.runner.model_runner import ModelRunner
from radixrt.runner.step_batch import flat_batch
from radixrt.sampling import SamplingBatch, probs, sample

TIME_DECAY = 0.9  # weight of the past in the draft step's measured time


class DraftModel:
    def __init__(self, config: EngineConfig, num_pages: int, vocab_size: int, eos_ids: Sequence[int]) -> None:
        quantization = config.speculative_draft_model_quantization or config.quantization
        draft_config = dataclasses.replace(
            config, model=config.speculative_draft_model_path, quantization=quantization,
            enable_deterministic_inference=False,  # drafts are only proposals: the target decides the output
        )  # fmt: skip
        self.runner = ModelRunner(draft_config, resolve_model_path(draft_config.model), num_pages=num_pages)
        if self.runner.model_config.vocab_size != vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({self.runner.model_config.vocab_size} tokens) differs from the "
                f"target's ({vocab_size}): a draft model must share the target's tokenizer"
            )
        self.page_size = config.page_size
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self.computed: dict[Req, int] = {}  # leading positions whose draft K/V this request wrote or trusts
        self.step_seconds = 0.0  # one draft step (forward, sampling, batch building), decaying average

    def propose(self, reqs: Sequence[Req], ks: Sequence[int]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """k[i] draft tokens for each request (its pages must cover k[i] positions past its last token), and
        for sampled (non-greedy) requests the [k, V] distributions they were drawn from."""
        began = time.perf_counter()
        drafts: list[list[int]] = [[] for _ in reqs]
        dists: list[list[torch.Tensor]] = [[] for _ in reqs]
        seqs = []
        for req in reqs:
            start = min(self.computed.get(req, req.cached_tokens), req.num_tokens - 1)
            seqs.append((req.page_table, start, req.token_ids[start:]))
        # A catch-up longer than a verify step's run is a prefill (a new request's prompt): not a step's cost.
        timed = sum(len(tokens) for _, _, tokens in seqs) <= len(reqs) * (max(ks) + 1)
        active, forwards = list(range(len(reqs))), 0
        while active:
            ends = [end - 1 for end in itertools.accumulate(len(tokens) for _, _, tokens in seqs)]
            logits = self.runner.forward(flat_batch(seqs, ends, self.page_size, self.runner.device))
            forwards += 1
            tokens, q = self._pick([reqs[i] for i in active], [drafts[i] for i in active], logits)
            for j, i in enumerate(active):
                drafts[i].append(tokens[j])
                if q is not None and not reqs[i].params.greedy:
                    dists[i].append(q[j])
            for i in active:
                self.computed[reqs[i]] = reqs[i].num_tokens - 1 + len(drafts[i])
            active = [i for i in active if len(drafts[i]) < ks[i]]
            seqs = [(reqs[i].page_table, reqs[i].num_tokens - 1 + len(drafts[i]), drafts[i][-1:]) for i in active]
        if timed:  # all of a draft step: its forward, sampling and batch building
            seconds = (time.perf_counter() - began) / forwards
            self.step_seconds = TIME_DECAY * (self.step_seconds or seconds) + (1 - TIME_DECAY) * seconds
        return drafts, [torch.stack(d) if d else None for d in dists]

    def prefill(self, reqs: Sequence[Req], num_new: Sequence[int]) -> None:
        """Compute the draft's K/V of this step's prefill chunks (the target's were just computed)."""
        seqs = []
        for req, n in zip(reqs, num_new):
            if n > 1:
                start = min(self.computed.get(req, req.cached_tokens), req.num_computed)
                seqs.append((req.page_table, start, req.token_ids[start : req.num_computed + n]))
                self.computed[req] = req.num_computed + n
        if seqs:
            self.runner.forward(flat_batch(seqs, [], self.page_size, self.runner.device))

    def rollback(self, req: Req) -> None:
        """After a verify step: the draft's K/V past the target's computed tokens held rejected drafts."""
        self.computed[req] = min(self.computed.get(req, 0), req.num_computed)

    def discard(self, req: Req) -> None:
        self.computed.pop(req, None)

    def _pick(
        self, reqs: list[Req], drafts: list[list[int]], logits: torch.Tensor
    ) -> tuple[list[int], torch.Tensor | None]:
        """Each request's next draft token under its own sampling parameters (penalties see the drafts so
        far): the argmax for greedy requests, else a draw from q, with the request's generator if seeded."""
        batch = SamplingBatch.build(
            [r.params for r in reqs],
            [r.prompt_ids for r in reqs],
            [r.output_ids + d for r, d in zip(reqs, drafts)],
            [None] * len(reqs),
            self.eos_ids,
            self.vocab_size,
            logits.device,
        )
        if batch.all_greedy:  # no distribution needed: the target keeps a greedy draft iff it is its argmax
            return sample(logits, batch).token_ids.tolist(), None
        q = probs(logits, batch)
        tokens = [
            int(q[j].argmax()) if r.params.greedy else int(torch.multinomial(q[j], 1, generator=r.generator))
            for j, r in enumerate(reqs)
        ]
        return tokens, q
