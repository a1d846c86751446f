"""The worker: owns the model, the KV pool, the prefix cache and the scheduler; runs steps.

`Worker.handle(msg)` takes the typed messages of `radixrt.ipc`; `Worker.step()` runs one
forward pass and returns what every request gained. The offline Engine calls these inline;
`radixrt.worker_process` wraps them in a ZMQ loop in a separate process.
"""

from __future__ import annotations

import logging
import time

import torch

from radixrt import ipc
from radixrt.attention import make_attention_backend
from radixrt.attention.base import ForwardBatch
from radixrt.cache.base import NoPrefixCache
from radixrt.cache.page_pool import KVPool
from radixrt.cache.radix_tree import RadixCache
from radixrt.config import EngineConfig
from radixrt.constrained.manager import GrammarManager
from radixrt.model.loader import iter_weights, load_tokenizer, read_model_config, resolve_model_path
from radixrt.model.llama import LlamaForCausalLM
from radixrt.request import Req
from radixrt.sampling import SamplingBatch, prompt_logprobs, sample
from radixrt.scheduler.scheduler import ScheduledBatch, Scheduler

log = logging.getLogger(__name__)


def load_model(config: EngineConfig, model_dir) -> LlamaForCausalLM:
    """Build our model for the checkpoint folder and copy its weights in."""
    model_config = read_model_config(model_dir)
    with torch.device(config.device):
        model = LlamaForCausalLM(model_config)
    model.load_weights(iter_weights(model_dir, config.torch_dtype, config.device))
    model.to(config.torch_dtype)
    model.rotary.float()  # rotary tables stay float32: bf16 angles lose precision at long positions
    return model.eval()


class Worker:
    def __init__(self, config: EngineConfig, model_dir=None) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.config = config
        self.model_dir = model_dir or resolve_model_path(config.model)
        self.model = load_model(config, self.model_dir)
        self.model_config = self.model.config
        num_pages = KVPool.pages_for_budget(
            self.model_config, int(config.kv_memory_gb * 2**30), config.page_size, config.torch_dtype
        )
        if config.max_total_tokens is not None:
            num_pages = min(num_pages, config.max_total_tokens // config.page_size)
        self.pool = KVPool(self.model_config, num_pages, config.page_size, config.torch_dtype, config.device)
        cache_cls = NoPrefixCache if config.disable_radix_cache else RadixCache
        self.cache = cache_cls(config.page_size, self.pool.allocator)
        model_max = config.max_context_len or self.model_config.max_position_embeddings
        # A request that alone outgrows the pool could never finish: cap the context at the pool size.
        self.max_context = min(model_max, self.model_config.max_position_embeddings, num_pages * config.page_size)
        self.scheduler = Scheduler(config, self.pool.allocator, self.cache, self.max_context)
        self.backend = make_attention_backend(config.attention_backend, config.device)
        self.eos_ids = set(self.model_config.eos_token_ids)
        self.grammars = GrammarManager(
            config.grammar_backend, lambda: load_tokenizer(self.model_dir), self.model_config.vocab_size, sorted(self.eos_ids)
        )
        self.reqs: dict[str, Req] = {}
        self._pending: list[ipc.ReqOutput] = []
        self.totals = {"prompt": 0, "generated": 0, "cached": 0, "finished": 0}
        log.info("worker ready: %d KV pages of %d tokens, %s backend", num_pages, config.page_size, self.backend.name)

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
        return None

    def add_request(self, msg: ipc.GenerateReq) -> None:
        error = self._check_request(msg)
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
                self._pending.append(ipc.ReqOutput(msg.rid, [], True, "error", error=f"constrained decoding unavailable: {exc}"))
        else:
            self.scheduler.add(req)

    def _check_request(self, msg: ipc.GenerateReq) -> str | None:
        if msg.rid in self.reqs:
            return f"duplicate request id {msg.rid!r}"
        if not msg.input_ids:
            return "the prompt is empty"
        if len(msg.input_ids) >= self.max_context:
            return f"the prompt has {len(msg.input_ids)} tokens; the context holds at most {self.max_context - 1}"
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in msg.input_ids):
            return f"token ids must be in [0, {vocab})"
        return None

    def abort(self, rid: str, reason: str = "abort") -> None:
        req = self.reqs.get(rid)
        if req is not None:
            self._pending.append(self._finish(req, [], reason))

    def flush_cache(self) -> bool:
        return self.cache.flush()

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending) or bool(self.grammars.compiling)

    # ----- one step ----------------------------------------------------------------------

    def step(self) -> list[ipc.ReqOutput]:
        outputs, self._pending = self._pending, []
        ready, failed = self.grammars.poll()
        for req in ready:
            self.scheduler.add(req)
        outputs.extend(self._finish(req, [], "error", error) for req, error in failed)
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            self.grammars.wait(timeout=0.01)
            return outputs
        batch, sample_rows, prompt_rows = self._build_batch(scheduled)
        logits = self.model(batch, self.pool, self.backend)
        for req, n in zip(scheduled.reqs, scheduled.num_new):
            req.num_computed += n
        self._record_prompt_logprobs(prompt_rows, logits, scheduled)
        samplers = [r for r in sample_rows if r[0].params.max_new_tokens > 0]
        outputs.extend(self._finish(r, [], "length") for r, _ in sample_rows if r.params.max_new_tokens == 0)
        if samplers:
            outputs.extend(self._sample(samplers, logits))
        for req, n in zip(scheduled.reqs, scheduled.num_new):
            if n > 1 and not req.finished:  # a prefill chunk: let waiting requests hit it from the next step
                self.scheduler.cache_progress(req)
        return outputs

    def _build_batch(self, scheduled: ScheduledBatch):
        """Flatten the step's tokens and find which logits rows each request needs."""
        ps = self.config.page_size
        ids, positions, slots, qo_indptr = [], [], [], [0]
        logits_rows: list[int] = []
        sample_rows: list[tuple[Req, int]] = []  # (req, index into logits)
        prompt_rows: list[tuple[Req, int, int, int]] = []  # (req, first logits row, count, first position)
        for req, n in zip(scheduled.reqs, scheduled.num_new):
            start = req.num_computed
            table = req.page_table
            ids.extend(req.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(table[p // ps] * ps + p % ps for p in range(start, start + n))
            first_row = qo_indptr[-1]
            qo_indptr.append(first_row + n)
            if req.params.prompt_logprobs and not req.output_ids:
                prompt_rows.append((req, len(logits_rows), n, start))
                logits_rows.extend(range(first_row, first_row + n))
                if start + n == req.num_tokens:
                    sample_rows.append((req, len(logits_rows) - 1))
            elif start + n == req.num_tokens:
                sample_rows.append((req, len(logits_rows)))
                logits_rows.append(first_row + n - 1)
        device = self.config.device
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            out_slots=torch.tensor(slots, dtype=torch.int64, device=device),
            qo_indptr=qo_indptr,
            prefix_lens=[r.num_computed for r in scheduled.reqs],
            seq_lens=[r.num_computed + n for r, n in zip(scheduled.reqs, scheduled.num_new)],
            page_tables=[r.page_table for r in scheduled.reqs],
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=device),
            page_size=ps,
        )
        return batch, sample_rows, prompt_rows

    def _record_prompt_logprobs(self, prompt_rows, logits: torch.Tensor, scheduled: ScheduledBatch) -> None:
        """Row at position p predicts token p + 1: that is prompt token p + 1's log-prob.

        The lists stay aligned with the prompt: tokens whose predicting position was not
        computed here (token 0, a cached prefix before `logprob_start_len`) get None.
        """
        for req, row, count, first_pos in prompt_rows:
            missing = first_pos + 1 - len(req.prompt_logprobs)
            req.prompt_logprobs.extend([None] * missing)
            req.prompt_top_logprobs.extend([] for _ in range(missing))
            start = len(req.prompt_logprobs)  # the first prompt token still without a log-prob
            last = min(first_pos + count, len(req.prompt_ids) - 1)  # predictions that land inside the prompt
            n = last - start + 1
            if n <= 0:
                continue
            first_row = row + start - 1 - first_pos
            targets = torch.tensor(req.prompt_ids[start : last + 1], device=logits.device)
            chosen, top_ids, top_vals = prompt_logprobs(
                logits[first_row : first_row + n], targets, req.params.top_logprobs
            )
            req.prompt_logprobs.extend(chosen.tolist())
            req.prompt_top_logprobs.extend(
                list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_vals.tolist())
            )

    def _sample(self, rows: list[tuple[Req, int]], logits: torch.Tensor) -> list[ipc.ReqOutput]:
        reqs = [r for r, _ in rows]
        picked = logits[torch.tensor([i for _, i in rows], device=logits.device)]
        batch = SamplingBatch.build(
            [r.params for r in reqs],
            [r.prompt_ids for r in reqs],
            [r.output_ids for r in reqs],
            [r.generator for r in reqs],
            sorted(self.eos_ids),
            self.model_config.vocab_size,
            logits.device,
        )
        masks = self.grammars.bitmask(reqs)
        result = sample(picked, batch, bitmask=masks and masks[0], bitmask_rows=masks and masks[1])
        tokens = result.token_ids.tolist()
        chosen = result.logprobs.tolist() if result.logprobs is not None else None
        top_ids = result.top_logprob_ids.tolist() if result.top_logprob_ids is not None else None
        top_vals = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        now = time.monotonic()
        outputs = []
        for i, (req, token) in enumerate(zip(reqs, tokens)):
            if req.grammar is not None and not req.grammar.accept_token(token):
                outputs.append(self._finish(req, [], "grammar_dead_end"))  # never emit a rejected token
                continue
            req.append_token(token)
            req.first_token_time = req.first_token_time or now
            if req.params.logprobs and chosen is not None:
                req.output_logprobs.append(chosen[i])
                k = req.params.top_logprobs
                req.output_top_logprobs.append(list(zip(top_ids[i][:k], top_vals[i][:k])) if k and top_ids else [])
            new = [token]
            reason = self._stop_reason(req, token)
            if reason is None and req.grammar is not None and self.config.enable_jump_forward:
                new += self._jump_forward(req)
            if reason:
                outputs.append(self._finish(req, new, reason))
            else:
                outputs.append(self._output(req, new, None))
        return outputs

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
        return out

    def _output(self, req: Req, new_tokens: list[int], reason: str | None) -> ipc.ReqOutput:
        n = len(new_tokens)
        finished = reason is not None
        return ipc.ReqOutput(
            rid=req.rid,
            new_token_ids=new_tokens,
            finished=finished,
            finish_reason=reason,
            matched_stop=new_tokens[-1] if reason == "stop" and new_tokens else None,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            logprobs=req.output_logprobs[-n:] if req.params.logprobs and n else None,
            top_logprobs=req.output_top_logprobs[-n:] if req.params.logprobs and n else None,
            prompt_logprobs=req.prompt_logprobs if finished and req.params.prompt_logprobs else None,
            prompt_top_logprobs=req.prompt_top_logprobs if finished and req.params.prompt_logprobs else None,
        )

    # ----- introspection -----------------------------------------------------------------

    def stats(self) -> ipc.EngineStats:
        c = self.cache.stats()
        alloc = self.pool.allocator
        cached_pages = c.cached_pages
        return ipc.EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            total_pages=alloc.num_pages,
            free_pages=alloc.num_free,
            used_pages=alloc.num_pages - alloc.num_free - cached_pages,
            cached_pages=cached_pages,
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
        )
