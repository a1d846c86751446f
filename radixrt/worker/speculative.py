"""Speculative decoding: draft tokens for the step's decode requests, then keep what the target agrees with.

    plan     for each decode request, a draft length k (draft_length.py: its acceptance so far, the
             batch's cost), then k drafts: prompt lookup in its own tokens (ngram.py), else in the radix
             cache (`PrefixCache.continuation`), else in its prompt's text (text_lookup.py), or k
             forwards of a draft model (draft_model.py); cut where the request's grammar rejects them;
             pages for 1 + k tokens (`Scheduler.reserve_drafts`)
    forward  one verify step, prefill-shaped: request b computes its last token and its k drafts, with
             logits at all 1 + k of them (runner/step_batch.py)
    accept   the run of tokens it keeps (sampling_spec.py); the worker appends them one by one, so
             grammar, stop tokens, max_new_tokens and the context limit cut the run where they apply
    commit   num_computed covers the kept drafts; the pages that hold only rejected drafts are freed
             (`Scheduler.trim`). Rejected tokens never reach the radix tree: their K/V lies past
             num_computed, and the cache is only ever given pages below it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from radixrt.cache.base import PrefixCache
from radixrt.config import EngineConfig
from radixrt.model.config import ModelConfig
from radixrt.request import Req
from radixrt.sampling_spec import accepted_run, rejection_sample, replay_noise
from radixrt.scheduler.scheduler import Scheduler
from radixrt.worker.draft_length import Acceptance, StepTimes, draft_length
from radixrt.worker.draft_model import DraftModel
from radixrt.worker.grammar import RequestGrammars
from radixrt.worker.ngram import NgramIndex
from radixrt.worker.text_lookup import TextLookup

# Tokens a radix-cache lookup matches: across many unrelated sequences, shorter matches are mostly chance.
CACHE_WINDOW = 4
# Acceptance is learnt per n-gram match length, up to this one (a cache continuation counts as the longest):
# a 1-token match in JSON is a guess, a 6-token match in a quoted passage nearly always right.
LONGEST_BUCKET = 4
TEXT_BUCKET = -1  # the acceptance of drafts found by characters (text_lookup.py)


@dataclass
class SpecCounts:
    """What a request (or the whole worker) verified. SGLang's accept length, completion_tokens / verify_ct,
    is the tokens a decode step yields (1 + accepted_tokens / verify_ct, less the prefill's first token)."""

    verify_ct: int = 0  # decode steps while speculation is on (SGLang's verify steps, with drafts or not this time)
    draft_tokens: int = 0  # draft tokens verified
    accepted_tokens: int = 0  # draft tokens the target agreed with


@dataclass
class _ReqState:
    ngrams: NgramIndex
    text: TextLookup | None  # None: text lookup off
    acceptance: dict[int, Acceptance] = field(default_factory=dict)  # by match length (0: a draft model)
    counts: SpecCounts = field(default_factory=SpecCounts)

    def rate_of(self, match: int) -> Acceptance:
        return self.acceptance.setdefault(min(match, LONGEST_BUCKET), Acceptance())


class Speculator:
    def __init__(
        self,
        config: EngineConfig,
        scheduler: Scheduler,
        cache: PrefixCache,
        grammars: RequestGrammars,
        vocab_size: int,
        max_context: int,
        draft: DraftModel | None,
        tokenizer=None,
    ) -> None:
        """`tokenizer`: for prompt lookup by characters (None: token n-grams only)."""
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.cache = cache
        self.grammars = grammars
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.draft = draft
        self.max_drafts = config.speculative_num_draft_tokens
        self.max_batch = config.speculative_max_batch_size
        self.adaptive = config.speculative_adaptive
        self.windows = (config.speculative_ngram_min_match_window_size, config.speculative_ngram_max_match_window_size)
        self.cache_window = min(max(CACHE_WINDOW, self.windows[0]), self.windows[1])
        self.from_cache = config.speculative_ngram_from_cache and draft is None
        self.states: dict[Req, _ReqState] = {}
        self.totals = SpecCounts()
        self.step_times = StepTimes()  # the target's forward time by the step's tokens (beta, gamma)
        self._planned: dict[Req, Acceptance] = {}  # this step's requests with pages for drafts, and what they learn
        self._dists: dict[Req, torch.Tensor] = {}  # this step's draft-model distributions of sampled requests

    # ----- before the forward ------------------------------------------------------------

    def plan(self, reqs: Sequence[Req], num_new: Sequence[int]) -> list[list[int]]:
        """The draft tokens of each scheduled request ([]: none), with pages reserved for them."""
        drafts: list[list[int]] = [[] for _ in reqs]
        self._planned.clear()
        self._dists.clear()
        decode = [i for i, (r, n) in enumerate(zip(reqs, num_new)) if n == 1 and r.output_ids and not r.is_prefilling]
        for i in decode:
            self._state(reqs[i]).counts.verify_ct += 1
        self.totals.verify_ct += len(decode)
        if not decode or len(decode) > self.max_batch:
            return drafts
        beta = self.step_times.beta(len(decode), sum(num_new))
        if self.draft is None:
            for i in decode:
                drafts[i] = self._lookup_drafts(reqs[i], beta)
        else:
            plain = self.step_times.seconds(sum(num_new))
            gamma = self.draft.step_seconds / plain if plain > 0 else 0.0
            self._model_drafts(reqs, decode, beta, gamma, drafts)
        return drafts

    def _lookup_drafts(self, req: Req, beta: float) -> list[int]:
        """Prompt lookup in the request's own tokens, else (if enabled) in the radix cache's sequences,
        else in its prompt's text; as many of the tokens found as pay off at the acceptance seen for
        matches of that kind."""
        limit = self._limit(req)
        if limit <= 0:
            return []
        state = self._state(req)
        draft, match = state.ngrams.propose(req.token_ids, limit)
        if not draft and self.from_cache:
            context = req.token_ids[-self.cache_window :]
            draft = self.cache.continuation(context, req.params.cache_salt, limit, self.cache_window)
            match = LONGEST_BUCKET  # a cross-request match of cache_window tokens: trusted like a long one
        if draft:
            learn = state.rate_of(match)
            if self.adaptive:
                draft = draft[: draft_length(learn, len(draft), beta)]
        elif state.text is not None:  # k first: the text lookup costs tokenizer calls, skipped when it does not pay
            learn = state.rate_of(TEXT_BUCKET)
            k = draft_length(learn, limit, beta) if self.adaptive else limit
            draft = state.text.propose(req.token_ids, k) if k else []
        if not draft:
            return []
        draft = self._grammar_cut(req, draft)
        draft = draft[: self.scheduler.reserve_drafts(req, len(draft))]
        if draft:
            self._planned[req] = learn
        return draft

    def _model_drafts(
        self, reqs: Sequence[Req], decode: list[int], beta: float, gamma: float, drafts: list[list[int]]
    ) -> None:
        """k forwards of the draft model; pages first, as it writes K/V up to k - 1 past the last token."""
        wanted: dict[int, int] = {}
        for i in decode:
            limit, learn = self._limit(reqs[i]), self._state(reqs[i]).rate_of(0)
            k = draft_length(learn, limit, beta, gamma, probe=False) if self.adaptive and limit > 0 else max(limit, 0)
            k = self.scheduler.reserve_drafts(reqs[i], k)
            if k:
                wanted[i] = k
                self._planned[reqs[i]] = learn  # commit frees the pages that drafts cut below leave unused
        if not wanted:
            return
        proposed, dists = self.draft.propose([reqs[i] for i in wanted], list(wanted.values()))
        for i, draft, dist in zip(wanted, proposed, dists):
            drafts[i] = self._grammar_cut(reqs[i], draft)
            if dist is not None:
                self._dists[reqs[i]] = dist

    def _limit(self, req: Req) -> int:
        """The most drafts worth verifying: the run ends at max_new_tokens, and positions at the context."""
        return min(self.max_drafts, req.params.max_new_tokens - len(req.output_ids) - 1,
                   self.max_context - req.num_tokens)  # fmt: skip

    def _grammar_cut(self, req: Req, draft: list[int]) -> list[int]:
        return draft[: self.grammars.valid_drafts(req, draft)] if draft and req.grammar is not None else draft

    def prefilled(self, reqs: Sequence[Req], num_new: Sequence[int]) -> None:
        """After the target's forward, before num_computed moves: the draft model computes the prefill chunks too."""
        if self.draft is not None:
            self.draft.prefill(reqs, num_new)

    def observe_target(self, tokens: int, seconds: float) -> None:
        """How long the target's forward of `tokens` tokens (drafts included) took, in a step without prefill."""
        self.step_times.observe(tokens, seconds)

    # ----- after the forward -------------------------------------------------------------

    def noise_states(self, reqs: Sequence[Req], drafts: Sequence[Sequence[int]]) -> dict[Req, torch.Tensor]:
        """The generators of seeded, sampled requests with drafts, before the verify step draws from them."""
        return {r: r.generator.get_state() for r, d in zip(reqs, drafts)
                if d and r.generator is not None and not r.params.greedy}  # fmt: skip

    def accept(
        self,
        reqs: Sequence[Req],
        drafts: Sequence[Sequence[int]],
        sampled: Sequence[int],
        noise: dict[Req, torch.Tensor],
        target_probs: Callable[[], torch.Tensor],
    ) -> list[list[int]]:
        """The run of tokens each request keeps; `sampled` holds a token per verify row (1 + len(draft) per
        request), `target_probs` the rows' distributions, computed only if a draft model sampled."""
        runs, row, p = [], 0, None
        for req, draft in zip(reqs, drafts):
            rows = sampled[row : row + len(draft) + 1]
            q = self._dists.get(req)
            if q is None or not draft:
                run = accepted_run(rows, draft)
                if req in noise:
                    replay_noise(req.generator, noise[req], len(run), self.vocab_size)
            else:
                p = target_probs() if p is None else p
                if req in noise:
                    req.generator.set_state(noise[req])
                run = rejection_sample(p[row : row + len(draft) + 1], q[: len(draft)], draft, req.generator)
            runs.append(run)
            row += len(draft) + 1
        return runs

    def commit(self, req: Req, drafted: int, kept: int, appended: int) -> None:
        """After the worker appended `appended` tokens of a run in which the target agreed with `kept` of
        `drafted` drafts: count the kept drafts' K/V as computed, free the rejected ones' pages, learn."""
        if req not in self._planned:
            return
        req.num_computed += max(0, min(kept, appended - 1))  # never the last token: it has no K/V yet
        self.scheduler.trim(req)
        if self.draft is not None:
            self.draft.rollback(req)
        if drafted:
            self._planned[req].update(drafted, kept)
            for counts in (self.states[req].counts, self.totals):
                counts.draft_tokens += drafted
                counts.accepted_tokens += kept

    def counts(self, req: Req) -> SpecCounts:
        state = self.states.get(req)
        return state.counts if state is not None else SpecCounts()

    def discard(self, req: Req) -> None:
        """Forget a request that finished or was aborted."""
        self.states.pop(req, None)
        if self.draft is not None:
            self.draft.discard(req)

    def _state(self, req: Req) -> _ReqState:
        state = self.states.get(req)
        if state is None:
            text = TextLookup(self.tokenizer, req.prompt_ids) if self.tokenizer is not None else None
            state = self.states[req] = _ReqState(NgramIndex(*self.windows), text)
        return state


def make_speculator(
    config: EngineConfig,
    scheduler: Scheduler,
    cache: PrefixCache,
    grammars: RequestGrammars,
    model_config: ModelConfig,
    max_context: int,
    num_pages: int,
    tokenizer_loader: Callable,
) -> Speculator | None:
    """The worker's speculator for config.speculative_algorithm (loading the draft model, or the tokenizer
    for prompt lookup by characters), or None when off."""
    if not config.speculative_algorithm:
        return None
    vocab_size = model_config.vocab_size
    draft = None
    if config.speculative_algorithm == "DRAFT":
        draft = DraftModel(config, num_pages, vocab_size, sorted(set(model_config.eos_token_ids)))
    text = draft is None and config.speculative_ngram_text_lookup
    tokenizer = tokenizer_loader() if text else None
    return Speculator(config, scheduler, cache, grammars, vocab_size, max_context, draft, tokenizer)
