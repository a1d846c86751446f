"""Logits -> next tokens (and log-probs) for one step's batch, vectorized over the rows.

The worker calls `sample()` once per step with the last-position logits of every request
that produces a token, after building a `SamplingBatch` from those requests. Processing
order, each stage skipped when no row in the batch asked for it:

    raw logits [B, V] ──────────────────────────────────────────► logprobs (log_softmax of raw)
      1. grammar mask      (allowed == False -> -inf)
      2. min_new_tokens    (eos ids + stop_token_ids -> -inf while len(output) < min_new_tokens)
      3. repetition pen.   (HF: over prompt + output; seen logit > 0 -> / p, < 0 -> * p)
      4. freq / presence   (OpenAI: over output only; logit -= f * count + p * (count > 0))
      5. greedy rows       ──► argmax here (temperature 0)
      6. temperature       (logits / T)
      7. top_k             (keep the k largest)
      8. top_p             (keep the smallest prefix of the sorted distribution reaching p)
      9. min_p             (keep tokens with prob >= min_p * max prob)
     10. sample            argmax(probs / E), E ~ Exp(1) i.i.d.  (the exponential race)

The exponential race picks token i with probability probs[i] and needs no cumsum/search,
so every row is independent: a row with its own `torch.Generator` (a seeded request) draws
its V noise values from that generator alone and gets the same tokens whatever else is in
the batch; unseeded rows share one batch draw from the global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from radixrt.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """Per-step tensors built from the requests in the batch (B rows, vocabulary V)."""

    vocab_size: int
    greedy: torch.Tensor  # [B] bool, temperature == 0
    temperatures: torch.Tensor  # [B, 1] float32, 1.0 on greedy rows
    top_ks: torch.Tensor  # [B] int64, V when off (1 on greedy rows)
    top_ps: torch.Tensor  # [B] float32, 1.0 when off
    min_ps: torch.Tensor  # [B] float32, 0.0 when off
    repetition_penalties: torch.Tensor | None  # [B, 1] float32
    seen: torch.Tensor | None  # [B, V] bool: token occurs in prompt + output (repetition-penalty rows)
    frequency_penalties: torch.Tensor | None  # [B, 1] float32
    presence_penalties: torch.Tensor | None  # [B, 1] float32
    output_counts: torch.Tensor | None  # [B, V] float32: occurrences in the output (freq/presence rows)
    min_tokens_rows: torch.Tensor | None  # [N] int64 } the (row, token) pairs masked by min_new_tokens
    min_tokens_ids: torch.Tensor | None  # [N] int64  }
    seeded: list[tuple[int, torch.Generator]]  # sampled (non-greedy) rows with their own generator
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_logprobs: bool
    max_top_logprobs: int

    @property
    def any_penalty(self) -> bool:
        return self.repetition_penalties is not None or self.output_counts is not None

    @property
    def any_min_tokens(self) -> bool:
        return self.min_tokens_rows is not None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
        eos_token_ids: Sequence[int],
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> SamplingBatch:
        """Gather the rows' parameters into tensors; cost is O(B) plus O(tokens) for penalty rows."""
        V, B = vocab_size, len(params)
        greedy = [p.temperature == 0.0 for p in params]
        sampled = [i for i in range(B) if not greedy[i]]
        top_ks = [1 if g else (p.top_k if 0 < p.top_k < V else V) for p, g in zip(params, greedy)]
        top_ps = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        min_ps = [0.0 if g else p.min_p for p, g in zip(params, greedy)]

        def f32(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        fp_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
        seen = rep = freq = pres = counts = None
        if rep_rows:
            rep = f32([p.repetition_penalty for p in params]).unsqueeze(1)
            seen = _count_tokens([prompt_ids[i] + output_ids[i] for i in rep_rows], rep_rows, B, V, device) > 0
        if fp_rows:
            freq = f32([p.frequency_penalty for p in params]).unsqueeze(1)
            pres = f32([p.presence_penalty for p in params]).unsqueeze(1)
            counts = _count_tokens([output_ids[i] for i in fp_rows], fp_rows, B, V, device)

        mt_rows: list[int] = []
        mt_ids: list[int] = []
        for i, p in enumerate(params):
            if len(output_ids[i]) < p.min_new_tokens:
                ids = sorted({t for t in chain(eos_token_ids, p.stop_token_ids) if 0 <= t < V})
                mt_rows += [i] * len(ids)
                mt_ids += ids
        as_long = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731

        return cls(
            vocab_size=V,
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            temperatures=f32([1.0 if g else p.temperature for p, g in zip(params, greedy)]).unsqueeze(1),
            top_ks=as_long(top_ks),
            top_ps=f32(top_ps),
            min_ps=f32(min_ps),
            repetition_penalties=rep,
            seen=seen,
            frequency_penalties=freq,
            presence_penalties=pres,
            output_counts=counts,
            min_tokens_rows=as_long(mt_rows) if mt_rows else None,
            min_tokens_ids=as_long(mt_ids) if mt_rows else None,
            seeded=[(i, generators[i]) for i in sampled if generators[i] is not None],
            all_greedy=not sampled,
            any_top_k=any(top_ks[i] < V for i in sampled),
            any_top_p=any(top_ps[i] < 1.0 for i in sampled),
            any_min_p=any(min_ps[i] > 0.0 for i in sampled),
            any_logprobs=any(p.logprobs or p.top_logprobs > 0 for p in params),
            max_top_logprobs=max((p.top_logprobs for p in params), default=0),
        )


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32: log_softmax(raw logits)[token]; None when no row asked
    top_logprob_ids: torch.Tensor | None  # [B, max_top_logprobs] int64
    top_logprobs: torch.Tensor | None  # [B, max_top_logprobs] float32


def sample(logits: torch.Tensor, batch: SamplingBatch, allowed: torch.Tensor | None = None) -> SampleOutput:
    """Pick one token per row of `logits` [B, V]; `allowed` [B, V] bool comes from constrained decoding.

    `logits` is never modified. Log-probs are of the raw distribution (before any mask or
    penalty), as vLLM reports by default.
    """
    raw = logits if logits.dtype == torch.float32 else logits.float()
    x = raw
    if allowed is not None:
        x = x.masked_fill(~allowed, _NEG_INF)
    if batch.any_min_tokens:
        x = _mask_min_tokens(x if x is not raw else x.clone(), batch, check_dead_rows=allowed is not None)
    if batch.any_penalty:
        x = _apply_penalties(x, batch)

    if batch.all_greedy:
        token_ids = x.argmax(dim=-1)
    else:
        token_ids = _sample_rows(x, batch)

    if not batch.any_logprobs:
        return SampleOutput(token_ids, None, None, None)
    logp = raw.log_softmax(dim=-1)
    chosen = logp.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_ids = top_vals = None
    if batch.max_top_logprobs > 0:
        top_vals, top_ids = logp.topk(batch.max_top_logprobs, dim=-1)
    return SampleOutput(token_ids, chosen, top_ids, top_vals)


def prompt_logprobs(
    logits: torch.Tensor, next_ids: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of each prompt token given its prefix: logits[t] predicts next_ids[t] (= prompt[t + 1]).

    Returns (chosen [T] float32, top ids [T, top_n] int64, top values [T, top_n] float32).
    """
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, next_ids.long().unsqueeze(1)).squeeze(1)
    if top_n > 0:
        top_vals, top_ids = logp.topk(top_n, dim=-1)
    else:
        top_vals = logp.new_empty((logp.shape[0], 0))
        top_ids = torch.empty((logp.shape[0], 0), dtype=torch.int64, device=logp.device)
    return chosen, top_ids, top_vals


def _count_tokens(rows_ids: list[list[int]], rows: list[int], B: int, V: int, device) -> torch.Tensor:
    """[B, V] float32 occurrence counts of each row's ids, by one scatter_add over the flattened ids.

    Flat index = row * V + token id, so rows of any length need no padding.
    """
    flat = torch.tensor(list(chain.from_iterable(rows_ids)), dtype=torch.int64, device=device)
    lengths = torch.tensor([len(ids) for ids in rows_ids], dtype=torch.int64, device=device)
    row_of = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64, device=device), lengths)
    counts = torch.zeros(B * V, dtype=torch.float32, device=device)
    counts.scatter_add_(0, row_of * V + flat, torch.ones_like(flat, dtype=torch.float32))
    return counts.view(B, V)


def _mask_min_tokens(x: torch.Tensor, batch: SamplingBatch, check_dead_rows: bool) -> torch.Tensor:
    """Mask eos/stop ids (in place). If a grammar mask left only those ids, the grammar wins."""
    rows, ids = batch.min_tokens_rows, batch.min_tokens_ids
    before = x[rows, ids]
    x[rows, ids] = _NEG_INF
    if check_dead_rows:
        dead = torch.isneginf(x).all(dim=-1)
        x[rows, ids] = torch.where(dead[rows], before, x[rows, ids])
    return x


def _apply_penalties(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Rows without a penalty keep their logits exactly (/1, *1, -0)."""
    if batch.repetition_penalties is not None:
        p = batch.repetition_penalties
        x = torch.where(batch.seen, torch.where(x > 0, x / p, x * p), x)
    if batch.output_counts is not None:
        counts = batch.output_counts
        x = x - (batch.frequency_penalties * counts + batch.presence_penalties * (counts > 0))
    return x


def _sample_rows(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Steps 5-10 on a batch with at least one sampled row; greedy rows get the argmax of `x`."""
    greedy_ids = x.argmax(dim=-1)
    x = x / batch.temperatures  # a fresh tensor: the in-place steps below never touch the caller's
    if batch.any_top_p:
        x = _top_k_top_p(x, batch)
    elif batch.any_top_k:
        x = _top_k_threshold(x, batch)
    if batch.any_min_p:
        # prob >= min_p * max prob  <=>  logit >= max logit + log(min_p): no softmax needed.
        floor = x.amax(dim=-1, keepdim=True) + batch.min_ps.log().unsqueeze(1)
        x.masked_fill_(x < floor, _NEG_INF)

    probs = x.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, gen in batch.seeded:
        noise[row].exponential_(generator=gen)
    # exponential_ may return exactly 0; clamp so a masked token (prob 0) never becomes 0/0 = nan.
    sampled = probs.div_(noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
    return torch.where(batch.greedy, greedy_ids, sampled)


def _top_k_threshold(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """top_k alone: mask logits below each row's k-th largest, from one topk(K = largest k in use)."""
    active = batch.top_ks < batch.vocab_size
    k_max = int(batch.top_ks[active].max())
    values = x.topk(k_max, dim=-1).values
    kth = values.gather(1, (batch.top_ks.clamp(max=k_max) - 1).unsqueeze(1))
    kth = torch.where(active.unsqueeze(1), kth, _NEG_INF)
    return x.masked_fill_(x < kth, _NEG_INF)


def _top_k_top_p(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """top_k then top_p on the sorted candidates, scattered back to a full [B, V] row.

    When every row has a top_k, the candidates are topk(K = largest k), not a full sort:

        sorted [B, K]:  v0 >= v1 >= ... >= v(k-1) | -inf (past this row's k) ...
        keep position j  <=>  j < k  and  sum(probs[:j]) < top_p   (position 0 always kept)
    """
    V = batch.vocab_size
    k_max = int(batch.top_ks.max())
    if k_max < V:
        values, idx = x.topk(k_max, dim=-1)
    else:
        values, idx = x.sort(dim=-1, descending=True)
    positions = torch.arange(values.shape[1], device=x.device)
    values = values.masked_fill(positions >= batch.top_ks.unsqueeze(1), _NEG_INF)
    probs = values.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each position
    drop = (before >= batch.top_ps.unsqueeze(1)) & (batch.top_ps < 1.0).unsqueeze(1)
    values = values.masked_fill(drop, _NEG_INF)
    return torch.full_like(x, _NEG_INF).scatter_(1, idx, values)
