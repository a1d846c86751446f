"""Random walks through a grammar: the model-free way to test that a backend's masks are sound.

A walk samples uniformly among the allowed tokens, like a model with flat logits would. Uniform
sampling rarely ends anything (inside a JSON string one token in ~49k closes it), so after a
number of free steps the walk *finishes*: it takes a stop token when one is allowed, else
flips a coin between tokens made only of closing characters (`"`, `]`, `}`) and one-byte tokens.
Every output of a finished walk must be valid; a walk that hits `max_tokens` is reported as
unfinished, not as invalid.
"""

from __future__ import annotations

import random
import re
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
        if finishing:  # alternate, so a string that admits `]` and `}` (an email) still ends
            prefer = (self.closing, self.one_byte) if rng.random() < 0.5 else (self.one_byte, self.closing)
            for kind in prefer:
                cands = np.flatnonzero(allowed & kind)
                if len(cands):
                    return int(cands[rng.randrange(len(cands))])
        cands = np.flatnonzero(allowed)
        if not len(cands):  # only stop tokens are allowed
            return int(stops[rng.randrange(len(stops))])
        return int(cands[rng.randrange(len(cands))])


# ---- checking outputs (needs the `jsonschema` package, a test dependency) --------------------
_DATE_TIME = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2}(?:\.\d+)?)([Zz]|[+-]\d{2}:\d{2})",
                        re.ASCII)
_TIME = re.compile(r"(\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(?:[Zz]|[+-](\d{2}):(\d{2}))", re.ASCII)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s\"<>\\^`{|}]*", re.ASCII)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*", re.ASCII)


def _format_checker():
    """jsonschema's checkers for date/email/ip/uuid/regex, plus RFC 3339 date-time and time,
    uri and hostname (whose stock checkers need extra packages or follow draft 3)."""
    import datetime

    from jsonschema import FormatChecker

    checker = FormatChecker(formats=["date", "email", "idn-email", "ipv4", "ipv6", "uuid", "regex"])

    def full_time(value: str) -> bool:
        m = _TIME.fullmatch(value)
        return bool(m) and int(m[1]) < 24 and int(m[2]) < 60 and int(m[3]) < 61 and \
            (m[4] is None or (int(m[4]) < 24 and int(m[5]) < 60))

    def date_time(value: str) -> bool:
        m = _DATE_TIME.fullmatch(value)
        if not m or not full_time(m[2] + m[3]):
            return False
        try:
            datetime.date.fromisoformat(m[1])
            return True
        except ValueError:
            return False

    for name, check in [("date-time", date_time), ("time", full_time), ("uri", _URI.fullmatch),
                        ("hostname", _HOSTNAME.fullmatch)]:
        checker.checks(name)(lambda value, check=check: not isinstance(value, str) or bool(check(value)))
    return checker


def json_validator(schema):
    """A function text -> None (valid) or why it is not a valid JSON instance of `schema`.

    Schemas without "$schema" are read as draft 2020-12, or draft 7 if they use the older
    tuple form of "items". A schema the validator itself chokes on gives "unverifiable: ...".
    """
    import json as _json

    from jsonschema import Draft7Validator
    from jsonschema.validators import validator_for

    tuple_items = '"items": [' in _json.dumps(schema) or '"additionalItems"' in _json.dumps(schema)
    default = Draft7Validator if tuple_items else None
    cls = validator_for(schema, default=default) if default else validator_for(schema)
    validator = cls(schema, format_checker=_format_checker())

    def check(text: str | None) -> str | None:
        if text is None:
            return "not UTF-8"
        try:
            value = _json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        except ValueError as exc:
            return f"not JSON: {exc}"
        try:
            error = next(iter(validator.iter_errors(value)), None)
        except Exception as exc:  # noqa: BLE001 - a malformed schema breaks the validator itself
            return f"unverifiable: {type(exc).__name__}: {exc}"[:200]
        if error is None:
            return None
        return f"{error.message[:200]} at {'/'.join(map(str, error.absolute_path))}"

    return check


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key in object {keys}")
    return dict(pairs)
