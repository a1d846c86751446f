"""The worker: owns the requests, the prefix cache, the scheduler, grammars, sampling and stop rules.

`Worker.handle(msg)` takes the typed messages of `radixrt.ipc`; `Worker.step()` runs one
step and returns what every request gained. The model itself (weights, KV pool, attention)
is the `ModelRunner`'s: the worker decides which tokens run on which pages, the runner
computes them. The offline Engine calls the worker inline; `radixrt.worker.process` wraps
it in a ZMQ loop in a separate process.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from functools import partial

import torch

from radixrt import ipc
from radixrt.cache.page_pool import PageAllocator
from radixrt.cache.pins import pin_cap
from radixrt.cache.tiered import make_prefix_cache
from radixrt.config import EngineConfig
from radixrt.constrained.limits import GrammarLimits
from radixrt.model.loader import default_cache_dir, load_tokenizer, resolve_model_path
from radixrt.request import Req, prompt_error
from radixrt.runner.tensor_parallel import make_runner
from radixrt.sampling import SamplingBatch, probs, sample, select_rows
from radixrt.scheduler.scheduler import Scheduler
from radixrt.worker.grammar import RequestGrammars
from radixrt.worker.speculative import SpecCounts, make_speculator

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, model_dir: str | os.PathLike | None = None) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.config = config
        self.model_dir = model_dir or resolve_model_path(config.model)
        self.runner = make_runner(config, self.model_dir)  # rank 0 of a group when config.tp_size > 1
        self.model_config = self.runner.model_config
        num_pages = self.runner.pool.num_pages
        self.allocator = PageAllocator(num_pages)
        model_max = min(config.max_context_len or self.model_config.max_position_embeddings,
                        self.model_config.max_position_embeddings)  # fmt: skip
        # A request that alone outgrows the pool could never finish: cap the context at the pool size.
        self.max_context = min(model_max, num_pages * config.page_size)
        disk_dir = config.kv_disk_dir or (str(default_cache_dir() / "kv") if config.enable_hierarchical_cache else None)
        self.cache = make_prefix_cache(
            config.page_size, self.allocator, self.runner.pool, enabled=not config.disable_radix_cache,
            max_pinned_pages=pin_cap(num_pages, config.page_size, self.max_context, config.max_pinned_tokens),
            disk_dir=disk_dir, disk_bytes=int(config.kv_disk_gb * 2**30), model_dir=str(self.model_dir),
        )  # fmt: skip
        self.scheduler = Scheduler(
            self.allocator,
            self.cache,
            policy=config.schedule_policy,
            chunked_prefill_size=config.chunked_prefill_size,
            max_running_requests=config.max_running_requests,
            starvation_timeout_s=config.starvation_timeout_s,
            speculative_tokens=config.speculative_num_draft_tokens if config.speculative_algorithm else 0,
        )
        self.eos_ids = sorted(set(self.model_config.eos_token_ids))
        self.grammars = RequestGrammars(
            config.grammar_backend,
            partial(load_tokenizer, self.model_dir),  # not a lambda on self: that would keep the worker alive
            self.model_config.vocab_size,
            self.eos_ids,
            GrammarLimits(time_budget_s=config.grammar_compile_timeout_s),
        )
        self.speculator = make_speculator(
            config, self.scheduler, self.cache, self.grammars, self.model_config, self.max_context, num_pages,
            partial(load_tokenizer, self.model_dir),
        )  # speculative decoding (worker/speculative.py); None when off  # fmt: skip
        self.reqs: dict[str, Req] = {}
        self._pending: list[ipc.ReqOutput] = []
        self.totals = {"prompt": 0, "generated": 0, "cached": 0, "finished": 0}
        log.info(
            "worker ready: %d KV pages of %d tokens, %s backend", num_pages, config.page_size, self.runner.backend.name
        )

    # ----- messages ----------------------------------------------------------------------

    def handle(self, msg: ipc.ToWorker) -> ipc.FromWorker | None:
        if isinstance(msg, ipc.GenerateReq):
            self.add_request(msg)
        elif isinstance(msg, ipc.AbortReq):
            self.abort(msg.rid, msg.reason)
        elif isinstance(msg, ipc.FlushCacheReq):
            return ipc.FlushCacheResult(ok=self.flush_cache())
        elif isinstance(msg, ipc.StatsReq):
            return self.stats()
        elif isinstance(msg, (ipc.PinPrefixReq, ipc.UnpinPrefixReq)):
            return self.pin(msg)
        return None

    def add_request(self, msg: ipc.GenerateReq) -> None:
        error = (f"duplicate request id {msg.rid!r}" if msg.rid in self.reqs
                 else prompt_error(msg.input_ids, self.model_config.vocab_size, self.max_context))  # fmt: skip
        if error:
            self._pending.append(ipc.ReqOutput(msg.rid, [], True, "error", error=error))
            return
        req = Req(msg.rid, list(msg.input_ids), msg.params)
        self.reqs[req.rid] = req
        if msg.params.grammar_spec:
            try:
                self.grammars.submit(req)  # joins the scheduler once its grammar has compiled
            except Exception as exc:  # the grammar engine could not be set up for this tokenizer
                self.reqs.pop(req.rid)
                self._pending.append(
                    ipc.ReqOutput(msg.rid, [], True, "error", error=f"constrained decoding unavailable: {exc}")
                )
        else:
            self.scheduler.add(req)

    def abort(self, rid: str, reason: str = "abort") -> None:
        req = self.reqs.get(rid)
        if req is not None:
            self._pending.append(self._finish(req, [], reason))

    def flush_cache(self) -> bool:
        return self.cache.flush()

    def pin(self, msg: ipc.PinPrefixReq | ipc.UnpinPrefixReq) -> ipc.PinResult:
        """Pin or unpin a cached prefix (cache/pins.py)."""
        pins, ps = self.cache.pins, self.config.page_size
        if pins is None:
            return ipc.PinResult(False, error="pinning needs the radix cache (it is disabled)")
        if isinstance(msg, ipc.PinPrefixReq):
            result = pins.pin(msg.input_ids, msg.cache_salt)
            ok, tokens, error = result.ok, result.pinned_tokens, result.error
        else:
            ok, tokens = pins.unpin(msg.input_ids, msg.cache_salt), 0
            error = None if ok else "no pin was taken with this prefix and salt"
        return ipc.PinResult(ok, tokens, pins.pinned_pages * ps, pins.max_pages * ps, error)

    def close(self) -> None:
        """Stop the background work (grammar compiler processes, the disk tier's I/O, which is saved)."""
        self.grammars.close()
        self.cache.close()
        self.runner.close()

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending) or bool(self.grammars.compiling)

    # ----- one step ----------------------------------------------------------------------

    def step(self) -> list[ipc.ReqOutput]:
        outputs, self._pending = self._pending, []
        ready, failed = self.grammars.poll()
        for req in ready:
            self.scheduler.add(req)
        outputs.extend(self._fail(req, error) for req, error in failed)
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            self.grammars.wait(timeout=0.01)
            self.cache.wait(timeout=0.01)  # a prefix on its way from disk
            return outputs
        drafts = self.speculator.plan(scheduled.reqs, scheduled.num_new) if self.speculator else None
        num_new = [n + len(d) for n, d in zip(scheduled.num_new, drafts)] if drafts else scheduled.num_new
        step = self.runner.build(scheduled.reqs, num_new, drafts)
        start = time.perf_counter()
        logits = self.runner.run(step)
        if self.speculator:
            if all(n == 1 for n in scheduled.num_new):
                self.speculator.observe_target(sum(num_new), time.perf_counter() - start)
            self.speculator.prefilled(scheduled.reqs, scheduled.num_new)
        for req, n in zip(scheduled.reqs, scheduled.num_new):
            req.num_computed += n  # drafts' K/V counts once verification keeps them (Speculator.commit)
        first = list(itertools.accumulate((s.count for s in step.sample_rows), initial=0))  # into logits
        rows = [i for i, s in enumerate(step.sample_rows) if s.req.params.max_new_tokens > 0]
        outputs.extend(self._finish(s.req, [], "length") for s in step.sample_rows if s.req.params.max_new_tokens == 0)
        if rows:
            reqs = [step.sample_rows[i].req for i in rows]
            draft_of = dict(zip(scheduled.reqs, drafts)) if drafts else {}
            index = [r for i in rows for r in range(first[i], first[i + 1])]
            outputs.extend(self._sample(reqs, select_rows(logits, index), [draft_of.get(r, []) for r in reqs]))
        for req, n in zip(scheduled.reqs, scheduled.num_new):
            if n > 1 and not req.finished:  # a prefill chunk: let waiting requests hit it from the next step
                self.scheduler.cache_progress(req)
        return outputs

    def _sample(self, reqs: list[Req], logits: torch.Tensor, drafts: list[list[int]]) -> list[ipc.ReqOutput]:
        """One token per request; with drafts, the run verification keeps (worker/speculative.py): a request
        has a logits row per draft more, row j sampled as if its first j drafts were accepted."""
        rows = [(r, d[:j]) for r, d in zip(reqs, drafts) for j in range(len(d) + 1)]
        batch = SamplingBatch.build(
            [r.params for r, _ in rows],
            [r.prompt_ids for r, _ in rows],
            [r.output_ids + seen if seen else r.output_ids for r, seen in rows],
            [r.generator for r, _ in rows],
            self.eos_ids,
            self.model_config.vocab_size,
            logits.device,
        )
        masks = self.grammars.bitmask(reqs, drafts)
        noise = self.speculator.noise_states(reqs, drafts) if self.speculator else {}
        result = sample(logits, batch, bitmask=masks and masks[0], bitmask_rows=masks and masks[1])
        tokens = result.token_ids.tolist()
        if self.speculator:
            runs = self.speculator.accept(reqs, drafts, tokens, noise, lambda: probs(logits, batch, *(masks or ())))
        else:
            runs = [[t] for t in tokens]
        outputs, row = [], 0
        for req, draft, run in zip(reqs, drafts, runs):
            new, reason = self._append_run(req, run, row, tokens, result, logits)
            if self.speculator:
                self.speculator.commit(req, len(draft), len(run) - 1, len(new))
            if reason is None and req.grammar is not None and self.config.enable_jump_forward:
                new += self._jump_forward(req)
            outputs.append(self._finish(req, new, reason) if reason else self._output(req, new, None))
            row += len(draft) + 1
        return outputs

    def _append_run(self, req: Req, run: list[int], row: int, sampled: list[int], result, logits) -> tuple[list, str]:
        """Append the run's tokens (row + j: token j's logits row) until one ends the request: (appended, reason)."""
        new, reason, now = [], None, time.monotonic()
        for j, token in enumerate(run):
            if req.grammar is not None and not req.grammar.accept_token(token):
                return new, "grammar_dead_end"  # never emit a rejected token
            req.append_token(token)
            req.first_token_time = req.first_token_time or now
            if req.params.logprobs and result.logprobs is not None:
                i = row + j  # a draft model's rejection rule may keep another token than the row sampled
                chosen = result.logprobs[i] if token == sampled[i] else logits[i].float().log_softmax(-1)[token]
                req.output_logprobs.append(float(chosen))
                k = req.params.top_logprobs
                top = zip(result.top_logprob_ids[i, :k].tolist(), result.top_logprobs[i, :k].tolist()) if k else ()
                req.output_top_logprobs.append(list(top))
            new.append(token)
            reason = self._stop_reason(req, token)
            if reason:
                break
        return new, reason

    def _jump_forward(self, req: Req) -> list[int]:
        """Append the text the grammar forces; the next step computes it as one chunk, not a step per token."""
        budget = min(req.params.max_new_tokens - len(req.output_ids), self.max_context - req.num_tokens)
        forced = self.grammars.jump_forward(req, budget)  # never past max_context: pool-sized contexts hang
        for token in forced:
            req.append_token(token)
            if req.params.logprobs:  # forced, not sampled: certain under the grammar
                req.output_logprobs.append(0.0)
                req.output_top_logprobs.append([])
        return forced

    def _stop_reason(self, req: Req, token: int) -> str | None:
        params = req.params
        if token in params.stop_token_ids or (req.grammar is not None and req.grammar.is_terminated()):
            return "stop"
        if token in self.eos_ids and not params.ignore_eos and len(req.output_ids) >= params.min_new_tokens:
            return "stop"
        if len(req.output_ids) >= params.max_new_tokens or req.num_tokens >= self.max_context:
            return "length"
        return None

    def _finish(self, req: Req, new_tokens: list[int], reason: str, error: str | None = None) -> ipc.ReqOutput:
        self.grammars.discard(req)
        self.scheduler.remove(req)
        self.reqs.pop(req.rid, None)
        self.totals["prompt"] += len(req.prompt_ids)
        self.totals["generated"] += len(req.output_ids)
        self.totals["cached"] += req.cached_tokens
        self.totals["finished"] += 1
        out = self._output(req, new_tokens, reason)
        out.error = error
        if self.speculator is not None:
            self.speculator.discard(req)
        return out

    def _fail(self, req: Req, error: Exception) -> ipc.ReqOutput:
        out = self._finish(req, [], "error", str(error))
        out.error_status = getattr(error, "http_status", 400)
        return out

    def _output(self, req: Req, new_tokens: list[int], reason: str | None) -> ipc.ReqOutput:
        n = len(new_tokens)
        finished = reason is not None
        spec = self.speculator.counts(req) if self.speculator else SpecCounts()
        return ipc.ReqOutput(
            rid=req.rid,
            new_token_ids=new_tokens,
            finished=finished,
            finish_reason=reason,
            matched_stop=new_tokens[-1] if reason == "stop" and new_tokens else None,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            spec_verify_ct=spec.verify_ct,
            spec_draft_tokens=spec.draft_tokens,
            spec_accepted_tokens=spec.accepted_tokens,
            logprobs=req.output_logprobs[-n:] if req.params.logprobs and n else None,
            top_logprobs=req.output_top_logprobs[-n:] if req.params.logprobs and n else None,
            prompt_logprobs=req.prompt_logprobs if finished and req.params.prompt_logprobs else None,
            prompt_top_logprobs=req.prompt_top_logprobs if finished and req.params.prompt_logprobs else None,
            unenforced=list(req.grammar_unenforced) if req.grammar_unenforced and n == len(req.output_ids) else None,
        )

    # ----- introspection -----------------------------------------------------------------

    def stats(self) -> ipc.EngineStats:
        c = self.cache.stats()
        spec = self.speculator.totals if self.speculator else SpecCounts()
        return ipc.EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            total_pages=self.allocator.num_pages,
            free_pages=self.allocator.num_free,
            used_pages=self.allocator.num_pages - self.allocator.num_free - c.cached_pages,
            cached_pages=c.cached_pages,
            evictable_pages=self.cache.evictable_pages,
            protected_pages=self.cache.protected_pages,
            page_size=self.config.page_size,
            cache_hit_rate=c.hit_rate,
            hit_tokens=c.hit_tokens,
            query_tokens=c.query_tokens,
            evicted_tokens=c.evicted_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.totals["prompt"],
            generated_tokens=self.totals["generated"],
            cached_tokens=self.totals["cached"],
            num_finished=self.totals["finished"],
            pinned_pages=c.pinned_pages,
            num_pins=c.num_pins,
            max_pinned_pages=self.cache.pins.max_pages if self.cache.pins is not None else 0,
            disk_pages=c.disk_pages,
            disk_capacity_pages=c.disk_capacity_pages,
            disk_hit_tokens=c.disk_hit_tokens,
            disk_written_pages=c.disk_written_pages,
            disk_dropped_pages=c.disk_dropped_pages,
            disk_corrupt_pages=c.disk_corrupt_pages,
            disk_pending_io=c.disk_pending_io,
            spec_verify_ct=spec.verify_ct,
            spec_draft_tokens=spec.draft_tokens,
            spec_accepted_tokens=spec.accepted_tokens,
        )
