"""Incremental detokenization with stop strings, one `IncrementalDetokenizer` per request.

Decoding token by token breaks multi-byte characters and word-joining spaces, so we keep
two offsets (as vLLM and SGLang do): text is decoded from `prefix_offset`, and only the part
past `read_offset` is new. A chunk ending in U+FFFD is an unfinished character: wait.
While a stop string might still be forming at the end, that tail is held back. Stop strings
are matched by `StopStrings` (an Aho-Corasick automaton), so each new character costs the
same whatever the number and length of the stop strings.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from radixrt.frontend.stop_strings import StopStrings


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: StopStrings | Sequence[str] | None = None,
        skip_special_tokens: bool = True,
        include_stop_str: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = stop if isinstance(stop, StopStrings) else StopStrings(stop or [])
        self._stop_state = 0  # the automaton's state after reading `text`
        self.skip_special_tokens = skip_special_tokens
        self.include_stop_str = include_stop_str
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything decoded so far (up to and without a matched stop string)
        self.emitted = 0  # how much of `text` has been handed out
        self.matched_stop: str | None = None  # the stop string that ended the text, once one has

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
        """Add decoded text; cut it at the earliest stop string that now appears in it."""
        offset = len(self.text)
        self.text += new
        if not self.stops:
            return
        self._stop_state, match = self.stops.scan(self._stop_state, new, offset)
        if match is not None:
            start, index = match
            stop = self.stops.stops[index]
            self.text = self.text[: start + len(stop) if self.include_stop_str else start]
            self.emitted = min(self.emitted, len(self.text))
            self.matched_stop = stop

    def _release(self) -> str:
        """The text that can no longer become part of a stop string (all of it once one matched)."""
        end = len(self.text) if self.matched_stop is not None else len(self.text) - self.stops.pending(self._stop_state)
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
