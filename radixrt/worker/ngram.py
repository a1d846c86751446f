"""Prompt lookup: draft the tokens that followed the latest earlier occurrence of a request's last n tokens.

Agent workloads copy: JSON extraction quotes its input, tool loops re-emit tool output, an edit
rewrites most of a file. Matching the request's last n tokens (n from `max_n` down to `min_n`, the
longest match first) against its own prompt and output finds what comes next, for free.
"""

from __future__ import annotations

from collections.abc import Sequence


class NgramIndex:
    """One request's n-grams (prompt and output) -> where their latest occurrence ends.

    A request's tokens only grow (rejected drafts never enter them), so each lookup first indexes
    just the tokens added since the previous one: O(max_n - min_n + 1) dict writes per token.
    """

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self._ends: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n - min_n + 1)]
        self._indexed = 0  # n-grams ending before this position, with a token after them, are indexed

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], int]:
        """Up to k tokens that followed the longest, then latest, earlier match of tokens' last n; and n."""
        self._catch_up(tokens)
        end = len(tokens)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            start = self._ends[n - self.min_n].get(tuple(tokens[end - n :]))
            if start is not None:
                return list(tokens[start : start + k]), n
        return [], 0

    def _catch_up(self, tokens: Sequence[int]) -> None:
        """Index the n-gram ending at each new position e that has a continuation (tokens[e] exists)."""
        for e in range(self._indexed, len(tokens)):
            for n in range(self.min_n, min(self.max_n, e) + 1):
                self._ends[n - self.min_n][tuple(tokens[e - n : e])] = e
        self._indexed = max(self._indexed, len(tokens))
