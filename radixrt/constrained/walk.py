"""Random walks through a grammar: the model-free way to test that a backend's masks are sound.

A walk samples uniformly among the allowed tokens, like a model with flat logits would. Uniform
sampling rarely ends anything (inside a JSON string one token in ~49k closes it), so after a
random number of free steps the walk *finishes*: it takes a stop token when one is allowed,
else prefers tokens made only of closing characters (`"`, `]`, `}`), else one-byte tokens.
Every output of a finished walk must be valid; a walk that hits `max_tokens` is reported as
unfinished, not as invalid.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np

from .base import GrammarMatcher
from .bitmask import allocate_bitmask


@dataclass
class Walk:
    tokens: list[int]
    text: str | None  # None if the bytes are not UTF-8 (itself a soundness failure)
    terminated: bool
    error: str = ""  # a mask/accept disagreement or a dead end
    mask_s: list[float] = field(default_factory=list)  # seconds per fill_bitmask call


class Walker:
    """Reusable per tokenizer: precomputes each token's bytes and class."""

    def __init__(self, token_bytes: list[bytes | None], stop_token_ids, vocab_size: int) -> None:
        self.token_bytes = token_bytes
        self.vocab_size = vocab_size
        self.stop_ids = np.array(sorted(stop_token_ids), dtype=np.int64)
        self.closing = np.zeros(vocab_size, dtype=bool)
        self.one_byte = np.zeros(vocab_size, dtype=bool)
        for tid, data in enumerate(token_bytes[:vocab_size]):
            if data:
                self.closing[tid] = all(ch in b'"]}' for ch in data)
                self.one_byte[tid] = len(data) == 1

    def walk(self, matcher: GrammarMatcher, rng: random.Random, max_tokens: int = 512,
             free_steps: int = 32, stop_prob: float = 0.3, deadline: float | None = None,
             check_jump_forward: bool = False) -> Walk:
        bitmask = allocate_bitmask(1, self.vocab_size)
        words = bitmask[0].numpy()
        out = Walk(tokens=[], text=None, terminated=False)
        forced: list[tuple[int, str]] = []  # (bytes emitted so far, forced continuation)
        emitted = bytearray()
        for step in range(max_tokens):
            if deadline is not None and time.perf_counter() > deadline:
                out.error = "time budget exceeded"
                break
            if check_jump_forward:
                forced.append((len(emitted), matcher.find_jump_forward()))
            start = time.perf_counter()
            matcher.fill_bitmask(bitmask, 0)
            out.mask_s.append(time.perf_counter() - start)
            allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)
            if not allowed.any():
                out.error = "dead end: no token allowed"
                break
            token = self._choose(allowed, rng, finishing=step >= free_steps, stop_prob=stop_prob)
            if not matcher.accept_token(token):
                out.error = f"mask allowed token {token} but accept_token rejected it"
                break
            out.tokens.append(token)
            if matcher.is_terminated():
                out.terminated = True
                break
            if self.token_bytes[token] is None:
                out.error = f"mask allowed token {token}, which has no text (special or padding)"
                break
            emitted += self.token_bytes[token]
        try:
            out.text = emitted.decode("utf-8")
        except UnicodeDecodeError:
            out.text = None
        for at, text in forced:
            if out.terminated and not emitted[at:].startswith(text.encode()):
                out.error = f"jump-forward {text!r} at byte {at} disagrees with the output"
                break
        return out

    def _choose(self, allowed: np.ndarray, rng: random.Random, finishing: bool, stop_prob: float) -> int:
        stops = self.stop_ids[allowed[self.stop_ids]]
        if len(stops) and (finishing or rng.random() < stop_prob):
            return int(stops[rng.randrange(len(stops))])
        allowed = allowed.copy()
        allowed[self.stop_ids] = False
        if finishing:
            for prefer in (self.closing, self.one_byte):
                cands = np.flatnonzero(allowed & prefer)
                if len(cands):
                    return int(cands[rng.randrange(len(cands))])
        cands = np.flatnonzero(allowed)
        if not len(cands):  # only stop tokens are allowed
            return int(stops[rng.randrange(len(stops))])
        return int(cands[rng.randrange(len(cands))])
