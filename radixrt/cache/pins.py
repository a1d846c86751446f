"""Pinned prefixes: a system prompt or a tool schema kept in memory whatever the traffic does.

A pin is a lock that no request owns: `pin` locks the radix-tree node where the prefix's
cached match ends, so eviction (which only takes unlocked leaves) never frees its pages, and
`unpin` drops that lock. Pins are capped at `max_pages` distinct pages (two pins that share a
system prompt count its pages once), so pinning can never take the memory running requests
need. A pin covers whole pages that are cached when it is taken; the server computes the
prefix first (server/cache_routes.py), so in practice that is every whole page of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from radixrt.cache.base import PageHash, PrefixCache, chain_hashes

Node = Any  # a radix_tree node: what match_prefix returns as a handle (with .parent and .pages)
PINNED_SHARE = 0.2  # default cap: a fifth of the pool (vLLM's pinned_prefix_cap_ratio)


def pin_cap(num_pages: int, page_size: int, max_context: int, max_pinned_tokens: int | None = None) -> int:
    """Pages pins may hold: --max-pinned-tokens (default a fifth of the pool), and never so many that
    a request of the longest context allowed could no longer fit beside them: pinned pages are
    never evicted, so such a request would wait forever."""
    cap = int(num_pages * PINNED_SHARE) if max_pinned_tokens is None else max_pinned_tokens // page_size
    return max(0, min(cap, num_pages - -(-max_context // page_size) - 1))


@dataclass
class PinResult:
    ok: bool
    pinned_tokens: int  # of this prefix: its cached whole pages
    error: str | None = None


class PinnedPrefixes:
    def __init__(self, cache: PrefixCache, max_pages: int) -> None:
        self._cache = cache
        self.max_pages = max_pages
        # By the chain hash of the requested prefix's last whole page: pinning the same text
        # twice is one pin, and unpin finds it from the same text (salt included).
        self._pins: dict[PageHash, tuple[Node, int]] = {}

    def __len__(self) -> int:
        return len(self._pins)

    def pin(self, token_ids: Sequence[int], salt: str | None = None) -> PinResult:
        ps = self._cache.page_size
        hashes = chain_hashes(token_ids, ps, salt)
        if not hashes:
            return PinResult(False, 0, f"a pinned prefix needs at least one whole page ({ps} tokens)")
        if hashes[-1] in self._pins:
            return PinResult(True, self._pins[hashes[-1]][1])
        match = self._cache.match_prefix(token_ids, salt, record=False)
        if not match.pages:
            return PinResult(False, 0, "no page of this prefix is cached")
        pages = self._distinct_pages([node for node, _ in self._pins.values()] + [match.node])
        if pages > self.max_pages:
            return PinResult(
                False, 0, f"pinning would hold {pages} pages; the cap is {self.max_pages} (--max-pinned-tokens)"
            )
        self._cache.lock(match.node)
        self._pins[hashes[-1]] = (match.node, match.num_tokens)
        return PinResult(True, match.num_tokens)

    def unpin(self, token_ids: Sequence[int], salt: str | None = None) -> bool:
        """Drop the pin taken with the same prefix and salt; False when there was none."""
        hashes = chain_hashes(token_ids, self._cache.page_size, salt)
        pinned = self._pins.pop(hashes[-1], None) if hashes else None
        if pinned is None:
            return False
        self._cache.unlock(pinned[0])
        return True

    def release_all(self) -> dict[PageHash, tuple[Node, int]]:
        """Unlock every pin (a flush drops them); hand them back so `restore` can undo it."""
        pins, self._pins = self._pins, {}
        for node, _ in pins.values():
            self._cache.unlock(node)
        return pins

    def restore(self, pins: dict[PageHash, tuple[Node, int]]) -> None:
        for node, _ in pins.values():
            self._cache.lock(node)
        self._pins = pins

    @property
    def pinned_pages(self) -> int:
        return self._distinct_pages([node for node, _ in self._pins.values()])

    @staticmethod
    def _distinct_pages(nodes: list[Node]) -> int:
        """Pages on the paths from these nodes to their roots, each node counted once."""
        seen: set[int] = set()
        pages = 0
        for node in nodes:
            while node.parent is not None and id(node) not in seen:
                seen.add(id(node))
                pages += len(node.pages)
                node = node.parent
        return pages
