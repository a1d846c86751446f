"""Continuations from the radix tree: the tokens that followed an n-gram in a cached sequence.

Speculative decoding drafts from the cache too: a request often writes what an earlier one already
wrote (the previous turn of a chat, a sibling branch of an agent program, the last run of the same
tool loop). `CachedNgrams` maps each n-gram of the cached token ids (one window length, keyed with
the salt, so tenants never see each other's text) to where its latest occurrence ends: a node and an
absolute position on the path from the root to that node. Positions on a path survive edge splits
(a split keeps the lower node's identity and adds a node above it: the path spells the same tokens)::

    path to node C:  [ A: 1 2 3 4 ][ C: 7 8 9 9 ]      window 2:  (3, 4) -> (C, 4),  (4, 7) -> (C, 5), ...
    continuation of (3, 4): the path from position 4 on (7 8 9 9), then down the most recently used children

Entries of evicted nodes go stale: a lookup drops the one it meets, and the owner rebuilds the index
from the live tree when entries outnumber twice the cached tokens. The tree's nodes are read through
their `key`, `parent`, `children` and `access` attributes (radix_tree.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class CachedNgrams:
    def __init__(self, window: int) -> None:
        self.window = window
        self._where: dict[tuple, tuple[object, int]] = {}  # (salt, n-gram) -> (node, end position on its path)

    def __len__(self) -> int:
        return len(self._where)

    def add(self, salt: str | None, tokens: tuple[int, ...], start: int, node: object, offset: int = 0) -> None:
        """Index a new edge: `tokens` end the path to `node` (its edge begins at tokens[start]); tokens[0]
        is at position `offset` on that path (0: tokens is the whole path from the root)."""
        w = self.window
        for end in range(max(start, w), len(tokens) + 1):  # from start: a branch point leads here now
            self._where[(salt, tokens[end - w : end])] = (node, offset + end)

    def rebuild(self, roots: Mapping[str | None, object]) -> None:
        """Index every cached edge again, carrying only the last window - 1 tokens down each path."""
        self._where.clear()
        keep = self.window - 1
        for salt, root in roots.items():
            stack = [(child, (), 0) for child in root.children.values()]
            while stack:
                node, tail, depth = stack.pop()  # tail: the path's tokens just before node's edge
                tokens = tail + node.key
                self.add(salt, tokens, len(tail), node, offset=depth - len(tail))
                next_tail = tokens[max(len(tokens) - keep, 0) :] if keep else ()
                stack.extend((child, next_tail, depth + len(node.key)) for child in node.children.values())

    def continuation(self, salt: str | None, context: Sequence[int], max_tokens: int) -> list[int]:
        """Up to max_tokens tokens that followed context's last `window` tokens, or []."""
        if len(context) < self.window or max_tokens <= 0:
            return []
        key = (salt, tuple(context[len(context) - self.window :]))
        hit = self._where.get(key)
        if hit is None:
            return []
        node, end = hit
        if node.parent is None:  # evicted since it was indexed
            del self._where[key]
            return []
        return _read_from(node, end, max_tokens)


def _read_from(node, position: int, max_tokens: int) -> list[int]:
    """The tokens from `position` on along the path to `node`, then down the most recently used children."""
    chain = []
    while node.parent is not None:
        chain.append(node)
        node = node.parent
    out: list[int] = []
    depth = 0
    for edge in reversed(chain):
        if depth + len(edge.key) > position:
            out.extend(edge.key[max(position - depth, 0) :])
        depth += len(edge.key)
    node = chain[0]
    while len(out) < max_tokens and node.children:
        node = max(node.children.values(), key=lambda child: child.access)
        out.extend(node.key)
    return out[:max_tokens]
