"""A request's stop strings as one Aho-Corasick automaton: each new character is read once.

After each chunk of generated text the detokenizer needs two answers:

- did a stop string appear, and where does the earliest one start (the text is cut there);
- how long is the longest tail of the text that may still grow into a stop string (held back).

Searching every stop string in the text answers both in O(stops x text) per token, on the
server's event loop. The automaton answers both while reading each new character once: its
state *is* the longest tail of the text that is a prefix of some stop string (so its depth is
what to hold back), and each state knows the longest stop string ending there, which is the
match that starts earliest.

    stops "ab", "bc":   root ─a─> "a" ─b─> "ab" (stop 0)
                        └─b─> "b" ─c─> "bc" (stop 1)
    failure links: "ab" -> "b" (its longest proper suffix that is a node), "a", "b", "bc" -> root.
    Reading "xabc" visits root, "a", "ab" (stop 0 ends here), then for "c" falls back from "ab"
    to "b" and steps to "bc" (stop 1 ends here). The earlier start wins: the text is cut before "ab".

Building costs O(total characters of the stops); the server bounds those (--max-stop-strings,
--max-stop-chars) and builds big automata off its event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class StopStrings:
    """Immutable once built; the detokenizer keeps its own state (an int, 0 = nothing pending)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self._next: list[dict[str, int]] = [{}]  # node -> {character: child}
        self._depth = [0]  # node -> length of the text it stands for
        self._ends = [-1]  # node -> index of the longest stop that is a suffix of it, -1: none
        for index, stop in enumerate(self.stops):
            node = 0
            for ch in stop:
                child = self._next[node].get(ch)
                if child is None:
                    child = len(self._next)
                    self._next[node][ch] = child
                    self._next.append({})
                    self._depth.append(self._depth[node] + 1)
                    self._ends.append(-1)
                node = child
            if self._ends[node] == -1:  # a repeated stop string keeps its first index
                self._ends[node] = index
        self._fail = [0] * len(self._next)
        queue = deque(self._next[0].values())
        while queue:  # breadth first: a node's failure link is shallower, so already known
            node = queue.popleft()
            for ch, child in self._next[node].items():
                self._fail[child] = self._step(self._fail[node], ch) if node else 0
                if self._ends[child] == -1:
                    self._ends[child] = self._ends[self._fail[child]]
                queue.append(child)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def _step(self, node: int, ch: str) -> int:
        while node and ch not in self._next[node]:
            node = self._fail[node]
        return self._next[node].get(ch, 0)

    def scan(self, state: int, text: str, offset: int) -> tuple[int, tuple[int, int] | None]:
        """Read `text`, which starts at `offset` of everything read so far, from `state`.

        Returns the new state and the match that starts earliest among those ending in `text`,
        as (start offset, stop index); equal starts go to the stop listed first.
        """
        best: tuple[int, int] | None = None
        for j, ch in enumerate(text):
            state = self._step(state, ch)
            index = self._ends[state]
            if index >= 0:
                match = (offset + j + 1 - len(self.stops[index]), index)
                if best is None or match < best:
                    best = match
        return state, best

    def pending(self, state: int) -> int:
        """How many characters at the end of the text may still become a stop string."""
        return self._depth[state]
