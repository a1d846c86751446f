"""Prompt lookup by characters: drafts for text the prompt holds but tokenizes differently.

Token n-grams (ngram.py) miss a copy whose tokens differ from its source's. A passage has
` Portsmouth`, one token with its space; the same word opening a JSON string value is `P` `orts`
`mouth`, so the value's tokens never occurred before. Here the request's last characters are found
in its prompt's text, and the text after them is tokenized together with the last token's text, so
the draft continues from the model's own token boundary (a suffix tokenized alone can split
differently).
"""

from __future__ import annotations

from collections.abc import Sequence

TAIL_TOKENS = 8  # the request's last tokens whose text is matched
MAX_CHARS = 32  # the longest text suffix tried
MIN_CHARS = 3  # the shortest, unless it starts a word (then 1: a JSON value's first character)
DRAFT_CHARS = 64  # text after the match tokenized into the draft
# What is searched: the prompt's last tokens and characters. Bounds a lookup's cost (up to MAX_CHARS
# scans of it per step) and the decode when a request starts, whatever the prompt's length.
SOURCE_TOKENS = 8192
SOURCE_CHARS = 32768


class TextLookup:
    """One request's prompt text (its end: SOURCE_TOKENS), searched for the longest suffix of its latest text."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.source = tokenizer.decode(list(prompt_ids[-SOURCE_TOKENS:]))[-SOURCE_CHARS:]

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens of the prompt's text after its latest match of the request's last characters."""
        tail_ids = list(tokens[-TAIL_TOKENS:])
        tail = self.tokenizer.decode(tail_ids)
        for n in range(min(len(tail), MAX_CHARS), 0, -1):
            at = self._find(tail, n)
            if at >= 0:
                break
        else:
            return []
        last = tail_ids[-1]
        ids = self.tokenizer.encode(
            self.tokenizer.decode([last]) + self.source[at + n : at + n + DRAFT_CHARS], add_special_tokens=False
        )
        return ids[1 : 1 + k] if ids[:1] == [last] else []  # the last token must survive the re-tokenization

    def _find(self, tail: str, n: int) -> int:
        """Where the latest occurrence of tail's last n characters starts (with text after it), or -1.
        A suffix that starts a word in the tail (after a space, a quote, any non-alphanumeric) must start
        one in the prompt too; only such a suffix may be shorter than MIN_CHARS."""
        suffix = tail[-n:]
        starts_word = not suffix[0].isspace() and (n == len(tail) or not tail[-n - 1].isalnum())
        if n < MIN_CHARS and not starts_word:
            return -1
        end = len(self.source) - 1  # a match must leave a character to draft
        while (at := self.source.rfind(suffix, 0, end)) >= 0:
            if not starts_word or at == 0 or not self.source[at - 1].isalnum():
                return at
            end = at + n - 1
        return -1
