"""Incremental detokenization with stop strings, one `IncrementalDetokenizer` per request.

Decoding token by token breaks multi-byte characters and word-joining spaces, so we keep
two offsets (as vLLM and SGLang do): text is decoded from `prefix_offset`, and only the part
past `read_offset` is new. A chunk ending in U+FFFD is an unfinished character: wait.
While a stop string might still be forming at the end, that tail is held back.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: list[str] | None = None,
        skip_special_tokens: bool = True,
        include_stop_str: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop or []
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
            self.text += full[len(prefix) :]
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
                self.text += tail[len(prefix) :]
                self.read_offset = len(self.token_ids)
                self.prefix_offset = self.read_offset
            self._check_stop()
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _release(self) -> str:
        if self._check_stop():
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out
        hold = self._partial_stop_len()
        end = len(self.text) - hold
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def _check_stop(self) -> bool:
        """Cut the text at the earliest stop string, if any appeared in the unreleased part."""
        search_from = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        best = None
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[: i + len(s) if self.include_stop_str else i]
        self.emitted = min(self.emitted, len(self.text))
        self.matched_stop = s
        return True

    def _partial_stop_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
