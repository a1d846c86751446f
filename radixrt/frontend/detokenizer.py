"""Incremental detokenization with stop strings, one `IncrementalDetokenizer` per request.

Decoding token by token breaks multi-byte characters and word-joining spaces, so we keep
two offsets (as vLLM and SGLang do): text is decoded from `prefix_offset`, and only the part
past `read_offset` is new. A chunk ending in U+FFFD is an unfinished character: wait.
While a stop string or a stop regex might still be forming at the end, that tail is held back.
Stop strings are matched by `StopStrings` (an Aho-Corasick automaton), so each new character
costs the same whatever the number and length of the stop strings; stop regexes by
`StopRegexes`, on a bounded tail with a time budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from radixrt.frontend.stop_regex import StopRegexes
from radixrt.frontend.stop_strings import StopStrings
from radixrt.sampling_params import SamplingParams


@dataclass(frozen=True)
class StopRules:
    """A request's stop strings and stop regexes, built once (the server builds big ones off its event loop)."""

    strings: StopStrings
    regexes: StopRegexes | None = None

    @classmethod
    def build(cls, params: SamplingParams) -> "StopRules":
        """Raises RequestError (a ValueError) naming `stop_regex` for a pattern that cannot be used."""
        return cls(StopStrings(params.stop), StopRegexes(params.stop_regex) if params.stop_regex else None)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: StopRules | StopStrings | Sequence[str] | None = None,
        skip_special_tokens: bool = True,
        include_stop_str: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        if not isinstance(stop, StopRules):
            stop = StopRules(stop if isinstance(stop, StopStrings) else StopStrings(stop or []))
        self.stops, self.regexes = stop.strings, stop.regexes
        self._stop_state = 0  # the automaton's state after reading `text`
        self._regex_hold = 0  # `text` from here on may still become a regex match
        self.skip_special_tokens = skip_special_tokens
        self.include_stop_str = include_stop_str
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything decoded so far (up to and without a matched stop string)
        self.emitted = 0  # how much of `text` has been handed out
        self.matched_stop: str | None = None  # the stop string (or regex) that ended the text, once one has

    def add(self, new_ids: list[int]) -> str:
        """Feed new token ids; return the text that is now safe to show."""
        if self.matched_stop is not None:
            return ""
        self.token_ids.extend(new_ids)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # noqa: E731
        prefix = decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = decode(self.token_ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._append(full[len(prefix) :])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return self._release()

    def flush(self) -> str:
        """At the end of the request: hand out whatever was held back."""
        if self.matched_stop is None:
            tail = self.tokenizer.decode(
                self.token_ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens
            )
            prefix = self.tokenizer.decode(
                self.token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special_tokens
            )
            if len(tail) > len(prefix):
                self._append(tail[len(prefix) :])
                self.read_offset = len(self.token_ids)
                self.prefix_offset = self.read_offset
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _append(self, new: str) -> None:
        """Add decoded text; cut it at the earliest stop string or stop regex match that now appears in it."""
        offset = len(self.text)
        self.text += new
        found: list[tuple[int, int, str]] = []  # (start, end, what matched)
        if self.stops:
            self._stop_state, match = self.stops.scan(self._stop_state, new, offset)
            if match is not None:
                stop = self.stops.stops[match[1]]
                found.append((match[0], match[0] + len(stop), stop))
        if self.regexes:
            match, self._regex_hold = self.regexes.scan(self.text, offset)
            if match is not None:
                found.append((match[0], match[1], self.regexes.patterns[match[2]]))
        if found:
            start, end, what = min(found, key=lambda f: f[0])
            self.text = self.text[: end if self.include_stop_str else start]
            self.emitted = min(self.emitted, len(self.text))
            self.matched_stop = what

    def _release(self) -> str:
        """The text that can no longer become part of a stop string or regex match (all of it once one matched)."""
        end = len(self.text)
        if self.matched_stop is None:
            end -= self.stops.pending(self._stop_state)
            if self.regexes:
                end = min(end, self._regex_hold)
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
