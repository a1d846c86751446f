"""Scheduler: which requests run this step, with how many tokens, on which pages.

Each step holds one decode token for every running request that finished its prompt,
then prefill chunks (continuing ones first, then new admissions in policy order) up to
the chunked-prefill token budget. Pages come from the allocator, evicting unlocked
prefix-cache leaves when short; when decode still runs out, the newest running request
is preempted: its KV goes to the prefix cache (or back to the free list), it returns to
the head of the queue and is recomputed later. Memory pressure never fails a request. Over a
disk tier, a waiting request's pages on disk are loaded back before it is admitted (prefetch.py).

Speculative decoding (worker/speculative.py) adds draft tokens to a scheduled decode: their pages
come from `reserve_drafts`, which evicts cache leaves but never preempts (a draft is a bet, a
running request is not), and `trim` frees the pages that held only rejected drafts after the
verify step. Admission keeps pages for 1 + k tokens of headroom per running request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from radixrt.cache.base import PrefixCache
from radixrt.cache.page_pool import PageAllocator
from radixrt.cache.tiered import TieredCache
from radixrt.request import Req, ReqStatus
from radixrt.scheduler.policy import make_policy
from radixrt.scheduler.prefetch import Prefetcher

# A waiting request that would compute this many tokens a running prefill is computing
# right now waits instead (SGLang uses the same 32-token threshold).
IN_BATCH_SHARE_TOKENS = 32
# Waiting requests looked at per step: admission takes a few per step, so the order of the
# rest does not matter yet (and costs nothing: see waiting.py).
ADMIT_CANDIDATES = 256


@dataclass
class ScheduledBatch:
    """The requests of one step with their new-token counts; decode requests come first."""

    reqs: list[Req]
    num_new: list[int]


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        cache: PrefixCache,
        *,
        policy: str,
        chunked_prefill_size: int,
        max_running_requests: int,
        starvation_timeout_s: float,
        speculative_tokens: int = 0,
    ) -> None:
        self.allocator = allocator
        self.cache = cache
        self.page_size = cache.page_size
        # Pages a running request may need next step: its next token and up to k drafts after it.
        self.step_pages = -(-(1 + speculative_tokens) // self.page_size)
        self.chunked_prefill_size = chunked_prefill_size
        self.max_running_requests = max_running_requests
        self.policy = make_policy(policy, cache, starvation_timeout_s)
        self.waiting = self.policy.new_queue()
        self.prefetch = Prefetcher(cache, allocator) if isinstance(cache, TieredCache) else None
        self.running: list[Req] = []
        self.num_preemptions = 0

    # ----- queue -------------------------------------------------------------------------

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running) or self.cache.io_pending

    def remove(self, req: Req) -> None:
        """Take a request out (finish or abort), caching its KV and freeing its pages."""
        if req in self.running:
            self.running.remove(req)
            self.release(req)
        elif req in self.waiting:
            self.waiting.remove(req)
            if self.prefetch is not None:
                self.prefetch.release(req)
        req.status = ReqStatus.FINISHED

    # ----- one step ----------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        self.cache.poll()
        decode, num_new = [], []
        for req in list(self.running):
            if req.is_prefilling or req not in self.running:
                continue
            if self._reserve(req, req.num_computed + 1, preempt=True):
                decode.append(req)
                num_new.append(1)
        budget = self.chunked_prefill_size
        prefill: list[Req] = []
        for req in self.running:
            if req.is_prefilling and budget > 0:
                chunk = self._chunk_for(req, budget)
                if chunk:
                    prefill.append(req)
                    num_new.append(chunk)
                    budget -= chunk
        budget = self._admit(budget, prefill, num_new)
        reqs = decode + prefill
        return ScheduledBatch(reqs, num_new) if reqs else None

    def _admit(self, budget: int, prefill: list[Req], num_new: list[int]) -> int:
        """Move waiting requests into the running set while pages, budget and slots last."""
        if not self.waiting or budget <= 0 or len(self.running) >= self.max_running_requests:
            return budget
        in_flight = self._in_flight_pages()
        candidates = self.policy.order(self.waiting, time.monotonic(), ADMIT_CANDIDATES)
        if self.prefetch is not None:
            self.prefetch.ahead(candidates, _cacheable_len, headroom=len(self.running) * self.step_pages)
        for req in candidates:
            if budget <= 0 or len(self.running) >= self.max_running_requests:
                break
            if self.prefetch is not None and self.prefetch.loading(
                req, _cacheable_len(req), len(self.running) * self.step_pages
            ):
                continue  # its pages are on their way from disk
            if self._shares_in_flight(req, in_flight):
                continue  # next step it finds those pages cached instead of computing them again
            self._attach_prefix(req)
            chunk = self._chunk_for(req, budget, admitting=True)
            if not chunk:
                self._detach(req)
                break  # out of pages: keep the order, try again next step
            self.waiting.remove(req)
            if self.prefetch is not None:
                self.prefetch.release(req)
            self.running.append(req)
            req.status = ReqStatus.RUNNING
            prefill.append(req)
            num_new.append(chunk)
            budget -= chunk
            if self.cache.enabled:
                in_flight.update(req.page_hashes(self.page_size)[req.num_computed // self.page_size :])
        return budget

    def _in_flight_pages(self) -> set[int]:
        """Hashes of the pages running prefills are about to compute (in-batch prefix sharing)."""
        ps = self.page_size
        if not self.cache.enabled:
            return set()
        return {h for r in self.running if r.is_prefilling for h in r.page_hashes(ps)[r.num_computed // ps :]}

    def _shares_in_flight(self, req: Req, in_flight: set[int]) -> bool:
        """Would req compute at least IN_BATCH_SHARE_TOKENS that a running prefill computes now?"""
        if not in_flight:
            return False
        hashes = req.page_hashes(self.page_size)
        first = self.cache.cached_pages(hashes)
        end = first
        while end < len(hashes) and hashes[end] in in_flight:
            end += 1
        return (end - first) * self.page_size >= IN_BATCH_SHARE_TOKENS

    def _chunk_for(self, req: Req, budget: int, admitting: bool = False) -> int:
        """Tokens of req's prompt to compute now, with pages reserved for them (0: none fit).

        A running prefill takes whatever the pool still holds; a new admission must fit its
        whole first chunk plus headroom for every running request's next step (a page, or the pages
        of 1 + k tokens with speculative decoding), so admitting it does not force a preemption.
        """
        chunk = min(req.num_tokens - req.num_computed, budget)
        if admitting and self.running:
            headroom = len(self.running) * self.step_pages
            needed = -(-(req.num_computed + chunk) // self.page_size) - len(req.page_table)
            if self.allocator.num_free + self.cache.evictable_pages < needed + headroom:
                return 0
        if chunk > 0 and not self._reserve(req, req.num_computed + chunk, preempt=False):
            if admitting and self.running:
                return 0
            chunk = (len(req.page_table) + self.allocator.num_free) * self.page_size - req.num_computed
            if chunk <= 0 or not self._reserve(req, req.num_computed + chunk, preempt=False):
                return 0
        return chunk

    # ----- pages ----------------------------------------------------------------------

    def _reserve(self, req: Req, num_tokens: int, preempt: bool) -> bool:
        """Make req's page table cover num_tokens, evicting cache leaves and (if allowed) preempting."""
        needed = -(-num_tokens // self.page_size) - len(req.page_table)
        while needed > 0:
            if self.allocator.num_free < needed:
                self.cache.evict(needed - self.allocator.num_free)
            pages = self.allocator.alloc(needed)
            if pages is not None:
                req.page_table.extend(pages)
                return True
            if not preempt:
                return False
            victim = self.running[-1]
            self.preempt(victim)
            if victim is req:
                return False
        return True

    def reserve_drafts(self, req: Req, num_drafts: int) -> int:
        """Pages for a scheduled decode's next token plus up to num_drafts draft tokens after it, evicting
        cache leaves but never preempting; returns how many drafts fit."""
        if num_drafts <= 0:
            return 0
        if self._reserve(req, req.num_computed + 1 + num_drafts, preempt=False):
            return num_drafts
        return max(0, min(num_drafts, len(req.page_table) * self.page_size - req.num_computed - 1))

    def trim(self, req: Req) -> None:
        """Free req's pages past its computed tokens: after a verify step they hold only rejected
        drafts' K/V. Its page table then covers what it would without speculation."""
        keep = max(-(-req.num_computed // self.page_size), req.num_tree_pages)
        self.allocator.free(req.page_table[keep:])
        del req.page_table[keep:]

    def preempt(self, req: Req) -> None:
        """Release a running request's pages and put it back at the head of the queue."""
        self.running.remove(req)
        self.release(req)
        req.status = ReqStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _attach_prefix(self, req: Req) -> None:
        """Point a waiting request at its longest cached prefix and lock it."""
        match = self.cache.match_prefix(req.token_ids[: _cacheable_len(req)], req.params.cache_salt)
        self.cache.lock(match.node)
        req.cache_node = match.node
        req.page_table = list(match.pages)
        req.num_tree_pages = len(match.pages)
        req.num_computed = match.num_tokens
        if not req.admitted_once:
            req.cached_tokens = match.num_tokens
            req.admitted_once = True

    def _detach(self, req: Req) -> None:
        """Undo _attach_prefix for a request that could not be admitted after all."""
        own = req.page_table[req.num_tree_pages :]
        self.allocator.free(own)
        self.cache.unlock(req.cache_node)
        req.cache_node, req.page_table, req.num_tree_pages, req.num_computed = None, [], 0, 0

    def release(self, req: Req) -> None:
        """Hand a request's computed whole pages to the prefix cache and free the rest."""
        full = req.num_computed // self.page_size
        self._publish(req, full)
        self.allocator.free(req.page_table[full:])
        self.cache.unlock(req.cache_node)
        req.cache_node, req.page_table, req.num_tree_pages, req.num_computed = None, [], 0, 0

    def cache_progress(self, req: Req) -> None:
        """After a prefill chunk, publish its whole pages to the cache so others can hit them now."""
        full = req.num_computed // self.page_size
        if not self.cache.enabled or full <= req.num_tree_pages:
            return
        self._publish(req, full)
        # The request now reads the cache's pages (its duplicates were just freed) and locks them.
        key = req.token_ids[: full * self.page_size]
        match = self.cache.match_prefix(key, req.params.cache_salt, record=False)
        self.cache.lock(match.node)
        self.cache.unlock(req.cache_node)
        req.cache_node = match.node
        req.page_table[:full] = match.pages
        req.num_tree_pages = full

    def _publish(self, req: Req, full: int) -> None:
        """Insert req's first `full` pages into the cache; free req's copies of pages it already had."""
        ps = self.page_size
        key, hashes = req.token_ids[: full * ps], req.page_hashes(ps)[:full]
        already = self.cache.insert(key, req.page_table[:full], req.params.cache_salt, hashes)
        self.allocator.free(req.page_table[req.num_tree_pages : max(req.num_tree_pages, already // ps)])


def _cacheable_len(req: Req) -> int:
    """How many leading tokens of req may come from the prefix cache.

    At least one token is left to compute: its logits pick the next token. A request that
    wants prompt log-probs needs the logits at position t - 1 for each prompt token t it
    still lacks (from `logprob_start_len` on), so the cache may serve only what comes before.
    """
    limit = req.num_tokens - 1
    if req.params.prompt_logprobs and len(req.prompt_logprobs) < len(req.prompt_ids):
        first_needed = max(req.params.logprob_start_len, len(req.prompt_logprobs))
        limit = min(limit, max(first_needed - 1, 0))
    return limit
