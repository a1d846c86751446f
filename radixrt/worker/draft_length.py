"""Adaptive draft length: how many tokens to draft for a request this step, from how many it kept so far.

A verify step is a run of trials, one per draft, that stops at the first rejection; per-token
acceptance is estimated as kept / (kept + rejections) over exponentially decaying counts. With k
drafts a step yields E(k) = (1 - a^(k+1)) / (1 - a) tokens and costs C(k) = 1 + (beta + gamma) k plain
decode steps:

  - beta: one more token per speculating request in the target's forward. A step of N tokens costs
    about t0 + t1 N; on our 2-core CPU with the default model, t1 / t0 = TOKEN_COST (bench/speculative.py
    --measure-cost), so with B decode requests each drafting k the step grows by TOKEN_COST B k / (1 +
    TOKEN_COST N): 0.13 per draft at batch 1, 0.55 at batch 8, 0.8 at batch 32, where it no longer pays.
  - gamma: one draft-model step, relative to the target's step (measured as they run; 0 for n-gram).

k maximizes E(k) / C(k). When that is 0 the request decodes plainly; n-gram drafts (free to propose)
probe with one draft every PROBE_EVERY steps, so a request whose text turns repetitive gets them back. A
draft model does not probe: its K/V lags while it rests, and a probe's catch-up would cost a prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

TOKEN_COST = 0.15  # t1 / t0 of the default model's forward on our 2-core CPU (docs/speculative.md)
DECAY = 0.8  # weight of the past in the acceptance counts, per verify step
PROBE_EVERY = 16
MIN_GAIN = 1.05  # speculate only when the model of the step expects at least this speed-up


@dataclass
class Acceptance:
    """One request's decaying counts of kept drafts and of rejections (a prior of 2 kept, 1 rejected)."""

    kept: float = 2.0
    rejected: float = 1.0
    idle_steps: int = 0  # decode steps since speculation last paid off (for the probe)

    @property
    def rate(self) -> float:
        return self.kept / (self.kept + self.rejected)

    def update(self, drafted: int, kept: int) -> None:
        self.kept = DECAY * self.kept + kept
        self.rejected = DECAY * self.rejected + (kept < drafted)


def step_cost(batch_size: int, step_tokens: int) -> float:
    """beta: what one more token per decode request costs a step of `step_tokens`, relative to it."""
    return TOKEN_COST * batch_size / (1 + TOKEN_COST * step_tokens)


def draft_length(stats: Acceptance, max_k: int, beta: float, gamma: float = 0.0, probe: bool = True) -> int:
    """The k in [0, max_k] with the best expected tokens per cost; 1 on a probe step when that is 0."""
    a = min(stats.rate, 0.999)
    best, best_gain = 0, MIN_GAIN
    for k in range(1, max_k + 1):
        gain = (1 - a ** (k + 1)) / (1 - a) / (1 + (beta + gamma) * k)
        if gain > best_gain:
            best, best_gain = k, gain
    if best:
        stats.idle_steps = 0
        return best
    stats.idle_steps += 1
    return 1 if probe and max_k and stats.idle_steps % PROBE_EVERY == 0 else 0
