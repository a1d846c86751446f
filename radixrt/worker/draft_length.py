"""Adaptive draft length: how many tokens to draft for a request this step, from how many it kept so far.

A verify step is a run of trials, one per draft, that stops at the first rejection; per-token
acceptance is estimated as kept / (kept + rejections) over exponentially decaying counts. With k
drafts a step yields E(k) = (1 - a^(k+1)) / (1 - a) tokens and costs C(k) = 1 + (beta + gamma) k plain
decode steps:

  - beta: one more token per speculating request in the target's forward. A step of N tokens costs
    about t0 + t1 N, so with B decode requests each drafting k the step grows by t1 B k / (t0 + t1 N).
    `StepTimes` fits t0 and t1 to the forwards the worker times: a constant measured once went stale
    when the quantized kernel changed (4-bit weights: a draft costs 0.16 of a step at batch 1 and 0.7 at
    batch 8, bench/speculative.py --measure-cost), and bf16 or float32 weights draw other lines.
  - gamma: one draft-model step, relative to the target's step (measured as they run; 0 for n-gram).

k maximizes E(k) / C(k). When that is 0 the request decodes plainly; n-gram drafts (free to propose)
probe with one draft now and then, so a request whose text turns repetitive gets them back: every
beta / PROBE_BUDGET steps, so probes cost about 1% of a step at any batch size (every 16 steps at
batch 1, every ~70 at batch 8). A draft model does not probe: its K/V lags while it rests, and a
probe's catch-up would cost a prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

TOKEN_COST = 0.15  # the prior for t1 / t0 until forwards are timed: optimistic, so drafts run and get measured
DECAY = 0.8  # weight of the past in the acceptance counts, per verify step
PROBE_BUDGET = 0.01  # what probing may cost, as a share of the step
TIME_DECAY = 0.98  # weight of the past in the forward-time fit, per timed forward
PRIOR_WEIGHT = 4.0  # the prior's weight in the fit, as tokens^2: about one forward 2 tokens off the others
MIN_GAIN = 1.05  # speculate only when the model of the step expects at least this speed-up


@dataclass
class Acceptance:
    """One request's decaying counts of kept drafts and of rejections (a prior of 2 kept, 1 rejected)."""

    kept: float = 2.0
    rejected: float = 1.0
    idle_steps: int = 0  # decode steps since speculation last paid off or probed

    @property
    def rate(self) -> float:
        return self.kept / (self.kept + self.rejected)

    def update(self, drafted: int, kept: int) -> None:
        self.kept = DECAY * self.kept + kept
        self.rejected = DECAY * self.rejected + (kept < drafted)


class StepTimes:
    """The target's forward time as a line t0 + t1 N in the step's tokens, fitted by least squares to the
    forwards timed so far (weights decaying by TIME_DECAY per forward). Plain decode steps all have the
    batch's N; verify steps spread N, which fixes the slope. Until the data do, a penalty PRIOR_WEIGHT
    (t1 - TOKEN_COST t0)^2 holds t1 / t0 near the prior."""

    def __init__(self) -> None:
        self._sums = [0.0] * 5  # weighted sums of 1, N, N^2, T, N T

    def observe(self, tokens: int, seconds: float) -> None:
        terms = (1.0, tokens, tokens * tokens, seconds, tokens * seconds)
        self._sums = [TIME_DECAY * s + t for s, t in zip(self._sums, terms)]

    def line(self) -> tuple[float, float]:
        """(t0, t1) in seconds; (0, 0) before any forward was timed."""
        w, wx, wxx, wy, wxy = self._sums
        r, lam = TOKEN_COST, PRIOR_WEIGHT
        a11, a12, a22 = w + lam * r * r, wx - lam * r, wxx + lam
        det = a11 * a22 - a12 * a12
        if w == 0 or det <= 0:
            return 0.0, 0.0
        t0 = (wy * a22 - a12 * wxy) / det
        t1 = (a11 * wxy - a12 * wy) / det
        return t0, max(t1, 0.0)

    def seconds(self, tokens: int) -> float:
        t0, t1 = self.line()
        return t0 + t1 * tokens

    def beta(self, batch_size: int, step_tokens: int) -> float:
        """What one more token per decode request costs a step of `step_tokens`, relative to it."""
        t0, t1 = self.line()
        plain = t0 + t1 * step_tokens
        if plain <= 0:
            return TOKEN_COST * batch_size / (1 + TOKEN_COST * step_tokens)
        return t1 * batch_size / plain


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
    if not probe or not max_k or stats.idle_steps * PROBE_BUDGET < beta:
        return 0
    stats.idle_steps = 0
    return 1
