"""Logits -> next tokens (and log-probs) for one step's batch, vectorized over the rows.

The worker calls `sample()` once per step with the last-position logits of every request
that produces a token, after building a `SamplingBatch` from those requests. Processing
order, each stage skipped when no row in the batch asked for it:

    raw logits [B, V] ──────────────────────────► logprobs (log_softmax of raw)
      1. grammar mask      (allowed == False -> -inf)
      1b. logit_bias       (OpenAI: bias added to the token's logit; a masked token stays -inf)
      2. min_new_tokens    (eos ids + stop_token_ids -> -inf while len(output) < min_new_tokens)
      3. repetition pen.   (HF: over prompt + output; seen logit > 0 -> / p, < 0 -> * p)
      4. freq / presence   (OpenAI: over output only; logit -= f * count + p * (count > 0))
      5. greedy rows       ──► argmax here (temperature 0, or below MIN_TEMPERATURE)
      6. temperature       (logits / T)
      7. top_k             (keep the k largest)
      8. top_p             (keep the smallest prefix of the sorted distribution reaching p)
      9. min_p             (keep tokens with prob >= min_p * max prob)
     10. sample            argmax(probs / E), E = -log U ~ Exp(1) i.i.d.  (the exponential race)

The exponential race picks token i with probability probs[i] and needs no cumsum/search,
so rows are independent: a row with its own `torch.Generator` (a seeded request) draws its
V uniforms, in token-id order, from that generator alone and gets the same tokens whatever
else is in the batch; unseeded rows share one batch draw from the global RNG.

An all-greedy batch with no mask or penalty is one argmax (plus log_softmax if asked).

When every row has a top_k (K = the largest), steps 6-10 run on the [B, K] candidates from
one `topk`, never touching [B, V] again. Otherwise they run on [B, V]; top_p then looks at
the best 256 tokens, then 4096, and sorts a full row only where those hold less than top_p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from radixrt import _native
from radixrt.constrained.bitmask import apply_bitmask
from radixrt.sampling_params import SamplingParams

_NEG_INF = float("-inf")
# top_p without top_k looks this deep before a full sort: on CPU at V = 49152, topk(256) costs ~1/20
# of a sort and topk(4096) ~1/5; a real model's nucleus is usually in the first few hundred tokens.
_TOP_P_DEPTHS = (256, 4096)


@dataclass
class SamplingBatch:
    """Per-step tensors built from the requests in the batch (B rows, vocabulary V).

    Penalties are stored sparsely, as unique (row, token) pairs: a step touches only the
    tokens a request has seen, never a [B, V] count tensor.
    """

    vocab_size: int
    greedy: torch.Tensor  # [B] bool, SamplingParams.greedy
    temperatures: torch.Tensor  # [B, 1] float32, 1.0 on greedy rows
    top_ks: torch.Tensor  # [B] int64, V when off (1 on greedy rows)
    top_ps: torch.Tensor  # [B] float32, 1.0 when off
    min_ps: torch.Tensor  # [B] float32, 0.0 when off
    rep_pairs: tuple[torch.Tensor, torch.Tensor] | None  # (rows, ids) seen in prompt + output
    rep_factors: torch.Tensor | None  # [N] the pair's row repetition_penalty
    out_pairs: tuple[torch.Tensor, torch.Tensor] | None  # (rows, ids) seen in the output
    out_amounts: torch.Tensor | None  # [N] frequency * count + presence, subtracted from the logit
    min_tokens_pairs: tuple[torch.Tensor, torch.Tensor] | None  # (rows, ids) masked by min_new_tokens
    bias_pairs: tuple[torch.Tensor, torch.Tensor] | None  # (rows, ids) with a logit_bias
    bias_values: torch.Tensor | None  # [N] the bias added to each pair's logit
    seeded: list[tuple[int, torch.Generator]]  # sampled (non-greedy) rows with their own generator
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    max_top_k: int  # largest top_k over all rows, V when some sampled row has none
    max_active_top_k: int  # largest top_k among rows that have one (0 when none)
    any_logprobs: bool
    max_top_logprobs: int

    @property
    def any_penalty(self) -> bool:
        return self.rep_pairs is not None or self.out_pairs is not None

    @property
    def any_min_tokens(self) -> bool:
        return self.min_tokens_pairs is not None

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
        """Gather the rows' parameters into tensors: O(B), plus O(tokens) for rows with penalties."""
        V, B = vocab_size, len(params)
        greedy = [p.greedy for p in params]
        sampled = [i for i in range(B) if not greedy[i]]
        top_ks = [1 if g else (p.top_k if 0 < p.top_k < V else V) for p, g in zip(params, greedy)]
        top_ps = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        min_ps = [0.0 if g else p.min_p for p, g in zip(params, greedy)]

        def f32(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        def i64(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        rep_pairs = rep_factors = out_pairs = out_amounts = None
        rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if rep_rows:
            rows, ids, _ = _unique_pairs([prompt_ids[i] + output_ids[i] for i in rep_rows], rep_rows, V, device)
            rep_pairs, rep_factors = (rows, ids), f32([p.repetition_penalty for p in params])[rows]
        fp_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
        if fp_rows:
            rows, ids, counts = _unique_pairs([output_ids[i] for i in fp_rows], fp_rows, V, device)
            freq, pres = f32([p.frequency_penalty for p in params]), f32([p.presence_penalty for p in params])
            out_pairs, out_amounts = (rows, ids), freq[rows] * counts + pres[rows]

        mt_rows: list[int] = []
        mt_ids: list[int] = []
        for i, p in enumerate(params):
            if len(output_ids[i]) < p.min_new_tokens:
                ids = sorted({t for t in chain(eos_token_ids, p.stop_token_ids) if 0 <= t < V})
                mt_rows += [i] * len(ids)
                mt_ids += ids

        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        for i, p in enumerate(params):
            for t, v in (p.logit_bias or {}).items():
                if t < V:  # the front end refuses ids past the vocabulary; never index past it here
                    bias_rows.append(i)
                    bias_ids.append(t)
                    bias_values.append(v)

        active_ks = [top_ks[i] for i in sampled if top_ks[i] < V]
        return cls(
            vocab_size=V,
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            temperatures=f32([1.0 if g else p.temperature for p, g in zip(params, greedy)]).unsqueeze(1),
            top_ks=i64(top_ks),
            top_ps=f32(top_ps),
            min_ps=f32(min_ps),
            rep_pairs=rep_pairs,
            rep_factors=rep_factors,
            out_pairs=out_pairs,
            out_amounts=out_amounts,
            min_tokens_pairs=(i64(mt_rows), i64(mt_ids)) if mt_rows else None,
            bias_pairs=(i64(bias_rows), i64(bias_ids)) if bias_rows else None,
            bias_values=f32(bias_values) if bias_rows else None,
            seeded=[(i, generators[i]) for i in sampled if generators[i] is not None],
            all_greedy=not sampled,
            any_greedy=any(greedy),
            any_top_k=bool(active_ks),
            any_top_p=any(top_ps[i] < 1.0 for i in sampled),
            any_min_p=any(min_ps[i] > 0.0 for i in sampled),
            max_top_k=max(top_ks, default=V),
            max_active_top_k=max(active_ks, default=0),
            any_logprobs=any(p.logprobs or p.top_logprobs > 0 for p in params),
            max_top_logprobs=max((p.top_logprobs for p in params), default=0),
        )


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32: log_softmax(raw logits)[token]; None when no row asked
    top_logprob_ids: torch.Tensor | None  # [B, max_top_logprobs] int64
    top_logprobs: torch.Tensor | None  # [B, max_top_logprobs] float32


def _processed(
    logits: torch.Tensor,
    batch: SamplingBatch,
    allowed: torch.Tensor | None,
    bitmask: torch.Tensor | None,
    bitmask_rows: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw float32 logits, the logits after the stages before greedy/temperature): the second is the
    first, not a copy, when no stage applies."""
    raw = logits.float()  # no copy when already float32
    x = raw
    if allowed is not None:
        x = x.masked_fill(~allowed, _NEG_INF)
    if bitmask is not None:
        x = x.clone() if x is raw else x
        apply_bitmask(x, bitmask, bitmask_rows)
    constrained = allowed is not None or bitmask is not None
    if batch.bias_pairs is not None:
        x = x.clone() if x is raw else x
        x[batch.bias_pairs] += batch.bias_values
    if batch.any_min_tokens or batch.any_penalty:
        x = x.clone() if x is raw else x
        if batch.any_min_tokens:
            _mask_min_tokens(x, batch, check_dead_rows=constrained)
        _apply_penalties(x, batch)
    return raw, x


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of [B, V] rows; the native kernel where it applies (5x faster at [32, 49152])."""
    ops = _native.load() if x.device.type == "cpu" else None
    if ops is not None and x.dtype == torch.float32 and x.dim() == 2 and x.stride(-1) == 1 and x.shape[-1] > 0:
        return ops.argmax_rows(x)
    return x.argmax(dim=-1)


def select_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows]; a view when rows are consecutive (the usual case: no copy of a [B, V] logits tensor)."""
    if rows and rows[-1] - rows[0] == len(rows) - 1 and rows == list(range(rows[0], rows[-1] + 1)):
        return x[rows[0] : rows[-1] + 1]
    return x[rows]


def sample(
    logits: torch.Tensor,
    batch: SamplingBatch,
    allowed: torch.Tensor | None = None,
    bitmask: torch.Tensor | None = None,
    bitmask_rows: list[int] | None = None,
) -> SampleOutput:
    """Pick one token per row of `logits` [B, V].

    Constrained decoding passes either `allowed` [B, V] bool, or a packed int32 `bitmask`
    [B, ceil(V/32)] applied to `bitmask_rows` only (cheaper: one table lookup per mask byte).
    `logits` is never modified. Log-probs are of the raw distribution (before any mask or
    penalty), as vLLM reports by default.
    """
    raw, x = _processed(logits, batch, allowed, bitmask, bitmask_rows)
    token_ids = argmax(x) if batch.all_greedy else _sample_rows(x, batch, owned=x is not raw)

    if not batch.any_logprobs:
        return SampleOutput(token_ids, None, None, None)
    logp = raw.log_softmax(dim=-1)
    chosen = logp.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_ids = top_vals = None
    if batch.max_top_logprobs > 0:
        top_vals, top_ids = logp.topk(batch.max_top_logprobs, dim=-1)
    return SampleOutput(token_ids, chosen, top_ids, top_vals)


def probs(
    logits: torch.Tensor,
    batch: SamplingBatch,
    bitmask: torch.Tensor | None = None,
    bitmask_rows: list[int] | None = None,
) -> torch.Tensor:
    """[B, V] the distribution `sample` draws each row from (a one-hot at the argmax on greedy rows):
    speculative decoding's rejection rule compares the target's with a draft model's (sampling_spec.py)."""
    raw, x = _processed(logits, batch, None, bitmask, bitmask_rows)
    greedy_ids = argmax(x)
    out = _filter_full(x, batch, owned=x is not raw).softmax(dim=-1)
    if batch.any_greedy:
        out[batch.greedy] = torch.nn.functional.one_hot(greedy_ids[batch.greedy], out.shape[1]).to(out.dtype)
    return out


def seeded_noise(generator: torch.Generator, vocab_size: int) -> torch.Tensor:
    """The V uniforms a seeded row draws per sampled token, in token-id order, on the generator's device."""
    return torch.rand(vocab_size, generator=generator, device=generator.device)


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


def _unique_pairs(
    rows_ids: list[list[int]], rows: list[int], V: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique (row, token) pairs of the rows' ids with their counts, from one flat tensor.

    Key = row * V + token id, so rows of any length need no padding; `unique` counts them.
    """
    flat = torch.tensor(list(chain.from_iterable(rows_ids)), dtype=torch.int64, device=device)
    lengths = torch.tensor([len(ids) for ids in rows_ids], dtype=torch.int64, device=device)
    row_of = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64, device=device), lengths)
    keys, counts = torch.unique(row_of * V + flat, return_counts=True)
    return keys // V, keys % V, counts.float()


def _mask_min_tokens(x: torch.Tensor, batch: SamplingBatch, check_dead_rows: bool) -> None:
    """Mask eos/stop ids in place. If the grammar mask left nothing else, the grammar wins."""
    pairs = batch.min_tokens_pairs
    before = x[pairs]
    x[pairs] = _NEG_INF
    if check_dead_rows:
        dead = torch.isneginf(x).all(dim=-1)
        x[pairs] = torch.where(dead[pairs[0]], before, x[pairs])


def _apply_penalties(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition, then frequency/presence penalties, in place on the seen (row, token) pairs only."""
    if batch.rep_pairs is not None:
        seen, p = x[batch.rep_pairs], batch.rep_factors
        x[batch.rep_pairs] = torch.where(seen > 0, seen / p, seen * p)
    if batch.out_pairs is not None:
        x[batch.out_pairs] -= batch.out_amounts
    return x


def _sample_rows(x: torch.Tensor, batch: SamplingBatch, owned: bool) -> torch.Tensor:
    """Steps 5-10 for a batch with at least one sampled row; greedy rows get the argmax of `x`."""
    greedy_ids = argmax(x) if batch.any_greedy else None
    if batch.max_top_k < batch.vocab_size:
        values, idx = x.topk(batch.max_top_k, dim=-1)  # sorted: position j is the row's (j+1)-th best
        values /= batch.temperatures
        positions = torch.arange(values.shape[1], device=x.device)
        values.masked_fill_(positions >= batch.top_ks.unsqueeze(1), _NEG_INF)
        if batch.any_top_p:
            values.masked_fill_(values < _nucleus_floor(values, values.logsumexp(-1, keepdim=True), batch), _NEG_INF)
        choice = _race(_min_p(values, batch).softmax(dim=-1), batch, idx)
        sampled = idx.gather(1, choice.unsqueeze(1)).squeeze(1)
    else:
        sampled = _race(_filter_full(x, batch, owned).softmax(dim=-1), batch, None)
    return sampled if greedy_ids is None else torch.where(batch.greedy, greedy_ids, sampled)


def _filter_full(x: torch.Tensor, batch: SamplingBatch, owned: bool) -> torch.Tensor:
    """Steps 6-9 on full rows: divide by the temperature, then -inf outside top_k, the nucleus and min_p."""
    x = x.div_(batch.temperatures) if owned else x / batch.temperatures
    if batch.any_top_k:
        kth = x.topk(batch.max_active_top_k, dim=-1).values.gather(
            1, (batch.top_ks.clamp(max=batch.max_active_top_k) - 1).unsqueeze(1)
        )
        x.masked_fill_(x < torch.where(batch.top_ks.unsqueeze(1) < batch.vocab_size, kth, _NEG_INF), _NEG_INF)
    if batch.any_top_p:
        x.masked_fill_(x < _top_p_floor(x, batch), _NEG_INF)
    return _min_p(x, batch)


def _nucleus_floor(sorted_values: torch.Tensor, logz: torch.Tensor, batch: SamplingBatch, rows=None) -> torch.Tensor:
    """[R, 1] smallest logit kept by top_p, from each row's best logits sorted descending.

    Position j is kept while the mass strictly above it is < top_p (position 0 always is);
    rows with top_p == 1 get -inf (keep everything).
    """
    top_ps = batch.top_ps if rows is None else batch.top_ps[rows]
    probs = (sorted_values - logz).exp()
    above = probs.cumsum(dim=-1) - probs
    n_kept = (above < top_ps.unsqueeze(1)).sum(dim=-1, keepdim=True)
    floor = sorted_values.gather(1, n_kept - 1)
    return torch.where(top_ps.unsqueeze(1) < 1.0, floor, _NEG_INF)


def _top_p_floor(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[B, 1] top_p floor over full rows, looking only as deep as each row's nucleus needs.

    Every row first looks at its best 256 tokens; the rows whose nucleus goes deeper look at
    4096, and only the rest are sorted in full (topk(4096) is ~1/5 of a sort at V = 49152).
    """
    logz = x.logsumexp(dim=-1, keepdim=True)
    floor = torch.full_like(logz, _NEG_INF)
    rows = torch.arange(x.shape[0], device=x.device)[batch.top_ps < 1.0]
    V = x.shape[1]
    for depth in [d for d in _TOP_P_DEPTHS if d < V] + [V]:
        sub = x[rows] if len(rows) < x.shape[0] else x
        values = sub.topk(depth, dim=-1).values if depth < V else sub.sort(dim=-1, descending=True).values
        floor[rows] = _nucleus_floor(values, logz[rows], batch, rows)
        rows = rows[(values - logz[rows]).exp().sum(dim=-1) < batch.top_ps[rows]]  # nucleus deeper than `depth`
        if len(rows) == 0:
            break
    return floor


def _min_p(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """prob >= min_p * max prob  <=>  logit >= max logit + log(min_p): no softmax needed."""
    if batch.any_min_p:
        x.masked_fill_(x < x.amax(dim=-1, keepdim=True) + batch.min_ps.log().unsqueeze(1), _NEG_INF)
    return x


def _race(probs: torch.Tensor, batch: SamplingBatch, idx: torch.Tensor | None) -> torch.Tensor:
    """argmax(probs / E) per row, E ~ Exp(1): picks position j with probability probs[j].

    A seeded row always draws V uniforms in token-id order from its own generator (and reads
    them at its candidates `idx`), so its noise never depends on the rest of the batch. The
    draw happens on the generator's device: a CPU generator gives the same noise whatever
    device the logits are on.
    """
    noise = torch.rand_like(probs)
    for row, gen in batch.seeded:
        own = seeded_noise(gen, batch.vocab_size).to(probs.device)
        noise[row] = own if idx is None else own[idx[row]]
    noise.log_().neg_()  # -log U > 0 since U < 1; U == 0 gives inf, i.e. that token loses
    return argmax(probs.div_(noise))
