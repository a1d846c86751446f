"""A request's stop regexes (SGLang's `stop_regex`): generation ends where the output matches one.

A stop string is found by reading each new character once (stop_strings.py). A regex can match
across any span and can backtrack, so its matching is bounded differently, per new piece of text:

- a match must end in the new text and lie within the last STOP_REGEX_WINDOW characters (SGLang
  also matches on a tail); a pattern whose longest match is shorter (its sre width) looks back
  only that far, so a bounded pattern costs O(its width + the new text) per piece;
- the earliest position from which the text may still become a match (the `regex` module's
  partial matching) is held back from the stream, so a match never covers text already sent;
- all of a request's patterns share STOP_REGEX_BUDGET_S of matching per piece: past it
  (catastrophic backtracking) the request fails with a 400 naming `stop_regex`;
- a pattern that can match the empty string is refused: it would end every request at once.

    text:  ... already sent ... | held back | new text
                                ^ earliest partial match (may still become a match)
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import regex

from radixrt.frontend.errors import RequestError
from radixrt.sampling_params import STOP_REGEX_BUDGET_S, STOP_REGEX_WINDOW

try:  # the stdlib parser tells a pattern's shortest and longest match
    from re import _parser as sre_parse
except ImportError:  # Python 3.10
    import sre_parse  # type: ignore[no-redef]


class StopRegexes:
    """Compiled once per request (off the event loop when large); immutable afterwards."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = list(patterns)
        self._compiled = []
        self._reach = []  # how far back from the end of the text a match of each pattern can start
        for p in self.patterns:
            try:
                compiled = regex.compile(p)
            except (regex.error, TypeError, ValueError) as exc:
                raise RequestError(f"stop_regex {p!r} does not compile: {exc}", 400, "stop_regex") from None
            shortest, longest = _width(p, compiled)
            if shortest == 0:
                raise RequestError(
                    f"stop_regex {p!r} can match the empty string, which would end every request at once",
                    400,
                    "stop_regex",
                )
            self._compiled.append(compiled)
            self._reach.append(min(longest, STOP_REGEX_WINDOW))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def scan(self, text: str, new_start: int) -> tuple[tuple[int, int, int] | None, int]:
        """Look at `text` after `text[new_start:]` was appended.

        Returns the match that starts earliest among those ending in the new text, as
        (start, end, pattern index), or None; and, without a match, the position from which the
        text must be held back (len(text) when nothing may become a match).
        """
        deadline = time.perf_counter() + STOP_REGEX_BUDGET_S
        floor = max(0, len(text) - STOP_REGEX_WINDOW)
        best: tuple[int, int, int] | None = None
        for i, (pattern, reach) in enumerate(zip(self._compiled, self._reach)):
            m = self._search(i, pattern, text, max(floor, new_start + 1 - reach), deadline, partial=False)
            if m is not None and (best is None or m.start() < best[0]):
                best = (m.start(), m.end(), i)
        if best is not None:
            return best, len(text)
        hold = len(text)
        for i, (pattern, reach) in enumerate(zip(self._compiled, self._reach)):
            m = self._search(i, pattern, text, max(floor, len(text) - reach), deadline, partial=True)
            if m is not None:
                hold = min(hold, m.start())
        return None, hold

    def _search(self, i: int, pattern, text: str, pos: int, deadline: float, partial: bool):
        left = deadline - time.perf_counter()
        try:
            if left <= 0:
                raise TimeoutError
            return pattern.search(text, pos, partial=partial, timeout=left)
        except TimeoutError:
            raise RequestError(
                f"stop_regex {self.patterns[i]!r} takes more than {STOP_REGEX_BUDGET_S * 1000:g} ms to match "
                f"{len(text) - pos:,} characters (catastrophic backtracking); simplify it",
                400,
                "stop_regex",
            ) from None


def _width(pattern: str, compiled) -> tuple[int, int]:
    """(shortest, longest) match of `pattern`; longest is capped by the window. Patterns only the
    `regex` module parses count as unbounded, and as empty-matching when they match ''."""
    try:
        shortest, longest = sre_parse.parse(pattern).getwidth()
    except Exception:  # regex-only syntax (\p{L}, possessive quantifiers on old Pythons, ...)
        return (0 if compiled.fullmatch("") is not None else 1), STOP_REGEX_WINDOW
    return shortest, min(longest, STOP_REGEX_WINDOW)
