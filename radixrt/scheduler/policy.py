"""Orders the waiting queue each step: FCFS, longest prefix match, or DFS weight.

Every policy puts starving requests (waiting longer than the timeout) first, oldest first,
so a request with no cache hits still runs eventually.
"""

from __future__ import annotations

from collections import defaultdict

from radixrt.cache.base import PrefixCache
from radixrt.request import Req


class Policy:
    """FCFS: arrival order (preempted requests are re-queued at the head)."""

    name = "fcfs"

    def __init__(self, cache: PrefixCache, starvation_timeout_s: float) -> None:
        self.cache = cache
        self.starvation_timeout_s = starvation_timeout_s

    def order(self, waiting: list[Req], now: float) -> list[Req]:
        starving = [r for r in waiting if now - r.arrival_time > self.starvation_timeout_s]
        if not starving:
            return self.rank(waiting)
        rest = [r for r in waiting if now - r.arrival_time <= self.starvation_timeout_s]
        return starving + self.rank(rest)

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
    """SGLang's DFS weight: walk the tree depth first, heaviest subtree (most waiting requests) first.

    Requests that share a cached subtree run back to back, so that subtree stays hot while
    they use it, and a large group of sharers goes before a lone request. Within a node, the
    requests matched deeper (in its children) go before the ones whose match stops at it, as in
    SGLang: a miss that runs first evicts the pages the deeper hits were about to use (measured
    in bench/prefix_reuse.py's tight-KV run: visiting a node's own requests first dropped the
    hit rate below fcfs's).
    """

    name = "dfs-weight"

    def rank(self, waiting: list[Req]) -> list[Req]:
        if not self.cache.enabled:
            return waiting
        at_node: dict[int, list[Req]] = defaultdict(list)
        nodes: dict[int, object] = {}
        for r in waiting:
            node = self.cache.match_prefix(r.token_ids, r.params.cache_salt, record=False).node
            at_node[id(node)].append(r)
            nodes[id(node)] = node
        weight: dict[int, int] = defaultdict(int)
        roots: dict[int, object] = {}
        for key, reqs in at_node.items():
            node = nodes[key]
            while node is not None:  # every ancestor carries the requests below it
                weight[id(node)] += len(reqs)
                if node.parent is None:
                    roots[id(node)] = node
                node = node.parent
        ordered: list[Req] = []
        stack = [(node, False) for node in sorted(roots.values(), key=lambda n: weight[id(n)])]
        while stack:  # post-order: a node's subtree, heaviest child first, then its own requests
            node, children_done = stack.pop()
            if children_done:
                ordered.extend(at_node.get(id(node), ()))
                continue
            stack.append((node, True))
            children = [c for c in node.children.values() if weight.get(id(c))]
            stack.extend((c, False) for c in sorted(children, key=lambda n: weight[id(n)]))  # heaviest popped first
        return ordered


def make_policy(name: str, cache: PrefixCache, starvation_timeout_s: float) -> Policy:
    policies = {p.name: p for p in (Policy, LongestPrefixMatch, DFSWeight)}
    if name not in policies:
        raise ValueError(f"unknown schedule policy {name!r}; choose from {', '.join(policies)}")
    return policies[name](cache, starvation_timeout_s)
