"""Orders the waiting queue each step: FCFS, longest prefix match, or DFS weight.

Every policy puts starving requests (waiting longer than the timeout) first, in queue order,
so a request with no cache hits still runs eventually. A step only looks at the first `limit`
requests of the order (the scheduler admits a few per step), and the waiting queue
(waiting.py) produces those without touching the rest: its cached lengths are kept current by
the cache's news, so lpm costs O(limit log n) per step, not a re-rank of the whole queue.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from radixrt.cache.base import PrefixCache
from radixrt.request import Req
from radixrt.scheduler.waiting import WaitingQueue


class Policy(ABC):
    name: str
    ranks_by_cache = False  # the waiting queue must track each request's cached length

    def __init__(self, cache: PrefixCache, starvation_timeout_s: float) -> None:
        self.cache = cache
        self.starvation_timeout_s = starvation_timeout_s

    def new_queue(self) -> WaitingQueue:
        return WaitingQueue(self.cache, self.ranks_by_cache)

    def order(self, queue: WaitingQueue, now: float, limit: int) -> list[Req]:
        """The first `limit` waiting requests in the order to admit them."""
        first = queue.starving(now - self.starvation_timeout_s, limit)
        return first + self.rank(queue, limit - len(first)) if len(first) < limit else first

    @abstractmethod
    def rank(self, queue: WaitingQueue, limit: int) -> list[Req]:
        """The policy's own order of the first `limit` requests that are not starving."""


class FCFS(Policy):
    """Queue order: arrival order, with preempted requests re-queued at the head."""

    name = "fcfs"

    def rank(self, queue: WaitingQueue, limit: int) -> list[Req]:
        return queue.ranked(limit)


class LongestPrefixMatch(Policy):
    """Requests with the longest cached prefix (memory and disk tiers) first: they cost the least to start."""

    name = "lpm"
    ranks_by_cache = True

    def rank(self, queue: WaitingQueue, limit: int) -> list[Req]:
        return queue.ranked(limit)


class DFSWeight(Policy):
    """SGLang's DFS weight: requests that share a cached subtree run back to back, the subtree
    most requests share first, so that subtree stays hot while they use it. A walk of the
    whole queue through the memory tree each step."""

    name = "dfs-weight"

    def rank(self, queue: WaitingQueue, limit: int) -> list[Req]:
        waiting = queue.fresh()
        order = self.cache.dfs_order([(r.token_ids, r.params.cache_salt) for r in waiting])
        return [waiting[i] for i in order[:limit]]


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LongestPrefixMatch, DFSWeight, FCFS)}


def make_policy(name: str, cache: PrefixCache, starvation_timeout_s: float) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown schedule policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name](cache, starvation_timeout_s)
