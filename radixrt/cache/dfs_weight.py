"""SGLang's DFS-weight order of sequences over a radix tree (the `dfs-weight` scheduling policy).

Depth first through the cached prefixes, the subtree that most sequences match first, so that
sequences sharing a subtree run back to back while it is hot. Post-order, heaviest child first:
the sequences matched deeper in a node's subtree go before the ones whose match stops at the
node, as in SGLang (a miss that runs first evicts the pages the deeper hits were about to use:
bench/prefix_reuse.py's tight-KV run). Not counted in the hit statistics.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any


def dfs_weight_order(cache: Any, sequences: Sequence[tuple[Sequence[int], str | None]]) -> list[int]:
    """Indices of (token_ids, salt) `sequences` in DFS-weight order over `cache` (a RadixCache:
    its match handles are tree nodes with .parent and .children)."""
    at_node: dict[Any, list[int]] = defaultdict(list)
    for i, (token_ids, salt) in enumerate(sequences):
        at_node[cache.match_prefix(token_ids, salt, record=False).node].append(i)
    weight: dict[Any, int] = defaultdict(int)
    roots: dict[Any, None] = {}  # a dict, not a set: ties keep a reproducible order
    for node, indices in at_node.items():
        while node is not None:  # every ancestor carries the sequences below it
            weight[node] += len(indices)
            if node.parent is None:
                roots[node] = None
            node = node.parent
    ordered: list[int] = []
    stack = [(node, False) for node in sorted(roots, key=weight.__getitem__)]
    while stack:  # a node's subtree, heaviest child first, then its own sequences
        node, children_done = stack.pop()
        if children_done:
            ordered.extend(at_node.get(node, ()))
            continue
        stack.append((node, True))
        children = [c for c in node.children.values() if c in weight]
        stack.extend((c, False) for c in sorted(children, key=weight.__getitem__))  # heaviest popped first
    return ordered
