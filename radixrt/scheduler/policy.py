"""Orders the waiting queue each step: FCFS, longest prefix match, or DFS weight.

Every policy puts starving requests (waiting longer than the timeout) first, oldest first,
so a request with no cache hits still runs eventually. Policies only ask the prefix cache
questions (`cached_pages`, `dfs_order`); they never walk its tree.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from radixrt.cache.base import PrefixCache
from radixrt.request import Req


class Policy(ABC):
    name: str

    def __init__(self, cache: PrefixCache, starvation_timeout_s: float) -> None:
        self.cache = cache
        self.starvation_timeout_s = starvation_timeout_s

    def order(self, waiting: list[Req], now: float) -> list[Req]:
        starving = [r for r in waiting if now - r.arrival_time > self.starvation_timeout_s]
        if not starving:
            return self.rank(waiting)
        rest = [r for r in waiting if now - r.arrival_time <= self.starvation_timeout_s]
        return starving + self.rank(rest)

    @abstractmethod
    def rank(self, waiting: list[Req]) -> list[Req]:
        """The policy's own order of the (non-starving) waiting requests."""


class FCFS(Policy):
    """Arrival order (preempted requests are re-queued at the head)."""

    name = "fcfs"

    def rank(self, waiting: list[Req]) -> list[Req]:
        return waiting


class LongestPrefixMatch(Policy):
    """Requests with the longest cached prefix first: they cost the least to start."""

    name = "lpm"

    def rank(self, waiting: list[Req]) -> list[Req]:
        # Hash lookups, not tree walks: O(log pages) per request, cheap at thousands waiting.
        ps = self.cache.page_size
        lengths = {id(r): self.cache.cached_pages(r.page_hashes(ps)) for r in waiting}
        return sorted(waiting, key=lambda r: -lengths[id(r)])


class DFSWeight(Policy):
    """SGLang's DFS weight: requests that share a cached subtree run back to back, the subtree
    most requests share first, so that subtree stays hot while they use it."""

    name = "dfs-weight"

    def rank(self, waiting: list[Req]) -> list[Req]:
        order = self.cache.dfs_order([(r.token_ids, r.params.cache_salt) for r in waiting])
        return [waiting[i] for i in order]


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LongestPrefixMatch, DFSWeight, FCFS)}


def make_policy(name: str, cache: PrefixCache, starvation_timeout_s: float) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown schedule policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name](cache, starvation_timeout_s)
