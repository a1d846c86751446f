"""Speculative verification: which drafted tokens a request keeps, so that its output is distributed as without drafts.

A verify step computes the target's logits at the request's last token and after each draft. Row i
is sampled as if drafts[:i] had been kept (the worker's penalties and grammar masks see them too)::

    input:   t    d1   d2   d3          t: the last kept token; d: the drafts
    row:     0    1    2    3
    sample:  s0   s1   s2   s3          s_i: the token sampling draws at row i
    keep:    s0 .. s_m, where m = how many leading drafts equal what was sampled (d1 == s0, d2 == s1, ...)

Drafts that are a single guess (n-gram drafts, or a draft model decoding greedily) go through
`accepted_run`: every kept token is exactly what sampling would draw without speculation at that
point (same logits, same noise: a seeded row replays its generator, `replay_noise`), so greedy and
seeded output are the same token sequence with speculation on or off. Unseeded, it is the standard
rule for a point-mass draft: the draft is kept with probability p(d), and on rejection the token is
p's sample conditioned on differing from d, i.e. p with d removed, renormalized.

A draft model that samples proposes d_i ~ q_i; `rejection_sample` then applies the rule of Leviathan
et al. and Chen et al. (2023): keep d_i with probability min(1, p_i(d_i) / q_i(d_i)), otherwise draw
from norm(max(0, p_i - q_i)) and stop; when every draft is kept, draw a bonus token from p_k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from radixrt.sampling import seeded_noise


def accepted_run(sampled: Sequence[int], drafts: Sequence[int]) -> list[int]:
    """The tokens a request gains: sampled[: m + 1], m = how many leading drafts equal what was sampled."""
    m = 0
    while m < len(drafts) and sampled[m] == drafts[m]:
        m += 1
    return list(sampled[: m + 1])


def replay_noise(generator: torch.Generator, state: torch.Tensor, num_rows: int, vocab_size: int) -> None:
    """Leave a seeded generator where sampling num_rows tokens one step at a time would have: the verify
    step drew noise for every row, but only the rows whose token was kept happened."""
    generator.set_state(state)
    for _ in range(num_rows):
        seeded_noise(generator, vocab_size)


def rejection_sample(
    p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int], generator: torch.Generator | None = None
) -> list[int]:
    """The kept drafts and one more token. p: [k + 1, V] the target's distributions (row i after
    drafts[:i]); q: [k, V] the draft model's, drafts[i] drawn from q[i]."""
    k = len(drafts)
    u = torch.rand(k, generator=generator, dtype=torch.float64).tolist()
    for i, d in enumerate(drafts):
        if u[i] * float(q[i, d]) < float(p[i, d]):  # u < p / q: kept with probability min(1, p / q)
            continue
        residual = (p[i].double() - q[i].double()).clamp_(min=0)
        total = float(residual.sum())
        # p == q up to rounding leaves no residual: then the rejection itself had probability ~0.
        return list(drafts[:i]) + [_draw(residual / total if total > 0 else p[i].double(), generator)]
    return list(drafts) + [_draw(p[k].double(), generator)]


def _draw(dist: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(dist, 1, generator=generator))
