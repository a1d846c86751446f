"""Engine: the offline / in-process API (`generate`, `generate_stream`, `chat`).

The worker runs inline on one background thread that steps while there is work, so
calls from many threads (a DSL `run_batch`, fork branches) are batched together. Callers
talk to it with the same typed messages the ZMQ worker process uses.

For SGLang's users: `Engine(model_path=..., context_length=..., mem_fraction_static=...,
random_seed=..., log_level=...)` takes SGLang's argument names for what radixrt supports, a
`sampling_params` dict may carry `n`, and a `RequestOutput` reads like SGLang's dict
(`out["text"]`, `out["meta_info"]["completion_tokens"]`).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import msgspec

from radixrt import ipc
from radixrt.config import EngineConfig
from radixrt.frontend.chat_template import load_chat_template, render_chat
from radixrt.frontend.detokenizer import StopRules
from radixrt.frontend.errors import RequestError
from radixrt.frontend.output import Collected, Delta, OutputStream, Usage
from radixrt.ipc import TopLogprobs
from radixrt.kv_budget import resolve_kv_budget
from radixrt.model.loader import load_tokenizer, resolve_model_path
from radixrt.request import prompt_error
from radixrt.sampling_params import SamplingParams
from radixrt.worker.process import WorkerProcessClient
from radixrt.worker.worker import Worker

log = logging.getLogger(__name__)

Prompt = str | list[int]


@dataclass
class RequestOutput:
    """The result of one prompt."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs] | None = None
    ttft: float | None = None  # seconds from submission to the first generated token
    e2e_latency: float | None = None  # seconds from submission to the last token
    matched_stop: int | str | None = None  # the stop token id, stop string or stop regex that ended it
    rid: str = ""

    # SGLang's Engine.generate returns {"text", "output_ids", "meta_info"}: the same reads work here.
    KEYS = ("text", "output_ids", "meta_info")

    def __getitem__(self, key: str) -> Any:
        if key not in self.KEYS:
            raise KeyError(f"{key!r}: a RequestOutput reads as SGLang's dict with keys {', '.join(self.KEYS)}")
        return {"text": self.text, "output_ids": self.token_ids, "meta_info": self.meta_info}[key]

    def keys(self) -> tuple[str, ...]:
        return self.KEYS

    def __contains__(self, key: object) -> bool:
        return key in self.KEYS

    @property
    def meta_info(self) -> dict[str, Any]:
        """SGLang's meta_info: usage, finish reason (as a dict), latency, and log-probs when asked for."""
        reason: dict[str, Any] = {"type": self.finish_reason}
        if self.finish_reason == "length":
            reason["length"] = self.usage.completion_tokens
        elif self.finish_reason == "stop":
            reason["matched"] = self.matched_stop
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": reason,
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "cached_tokens": self.usage.cached_tokens,
            "e2e_latency": self.e2e_latency,
        }
        if self.logprobs is not None:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(self.logprobs, self.token_ids)]
            meta["output_top_logprobs"] = [[[lp, t, None] for t, lp in top] for top in self.top_logprobs or []]
        if self.prompt_logprobs is not None:
            meta["input_token_logprobs"] = [[lp, t, None] for lp, t in zip(self.prompt_logprobs, self.prompt_token_ids)]
        return meta


class EngineDeadError(RuntimeError):
    """The worker loop crashed; the engine cannot serve any more requests."""


class Engine:
    """`Engine(model=None, **config)`: config keys are the fields of `EngineConfig`.

    `worker_process=True` runs the worker in a child process behind the same ZMQ link the
    server uses (`radixrt.worker_process`); by default it runs inline on the loop thread.
    """

    def __init__(
        self, model: str | None = None, worker_process: bool = False, log_level: str | None = None, **config: Any
    ) -> None:
        if log_level is not None:  # SGLang's Engine(log_level="error"): radixrt's own loggers
            logging.getLogger("radixrt").setLevel(log_level.upper())
        config = EngineConfig.from_kwargs(model=model, **config)
        template = load_chat_template(config.chat_template) if config.chat_template else None
        self.config = resolve_kv_budget(config, resolve_model_path(config.model))
        self._inbox: queue.Queue[tuple[ipc.ToWorker, Future | None]] = queue.Queue()
        self._streams: dict[str, queue.Queue[ipc.ReqOutput]] = {}
        self._submitted: dict[str, float] = {}
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._closed = False
        self.worker: Worker | WorkerProcessClient
        built: Future[None] = Future()
        make = WorkerProcessClient if worker_process else Worker
        self._thread = threading.Thread(target=self._run, args=(make, built), name="radixrt-worker", daemon=True)
        self._thread.start()
        built.result()  # the worker is built (a failed load raises here)
        self.tokenizer = load_tokenizer(self.worker.model_dir)
        if template is not None:
            self.tokenizer.chat_template = template
        self.max_context = self.worker.max_context

    # ----- public API --------------------------------------------------------------------

    def generate(
        self,
        prompt: Prompt | list[Prompt] | None = None,
        sampling_params: SamplingParams | dict | list | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
    ) -> RequestOutput | list[RequestOutput]:
        """Generate for one prompt (returns one output) or a list (returns a list, in order). With `n`
        in a sampling_params dict, each prompt gets n samples (seed + j for sample j when seeded),
        and the answer is the flat list, prompt by prompt, as SGLang's."""
        prompts, single = self._normalize_prompts(prompt, input_ids)
        samples = self._params_per_prompt(sampling_params, len(prompts))
        # Validate everything before submitting anything, so a bad prompt fails the call cleanly.
        encoded = [ids for p, ps in zip(prompts, samples) for ids in [self._encode(p)] * len(ps)]
        params = [sp for ps in samples for sp in ps]
        stops = [self._stops(sp) for sp in params]
        pending = [self._submit(ids, sp) for ids, sp in zip(encoded, params)]
        outputs = [self._collect(*p, ids, sp, s) for p, ids, sp, s in zip(pending, encoded, params, stops)]
        return outputs[0] if single and len(outputs) == 1 else outputs

    def generate_stream(
        self, prompt: Prompt | None = None, sampling_params: SamplingParams | dict | None = None, input_ids=None
    ) -> Iterator[Delta]:
        """Yield Deltas (new text, token ids) as tokens are generated; the last one has `finished`
        and the final usage. Stopping the iteration early aborts the request."""
        prompts, _ = self._normalize_prompts(prompt, input_ids)
        if len(prompts) != 1:
            raise ValueError("generate_stream takes a single prompt")
        params = SamplingParams.from_any(sampling_params)
        stops = self._stops(params)
        yield from self._deltas(*self._submit(self._encode(prompts[0]), params), params, stops)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | dict | None = None) -> RequestOutput:
        """Apply the model's chat template and generate the assistant's reply."""
        return self.generate(self.render_chat(messages), sampling_params)

    def chat_stream(self, messages: list[dict], sampling_params=None) -> Iterator[Delta]:
        return self.generate_stream(self.render_chat(messages), sampling_params)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools=None) -> str:
        return render_chat(self.tokenizer, messages, add_generation_prompt, tools)

    def abort(self, rid: str, reason: str = "abort") -> None:
        self._inbox.put((ipc.AbortReq(rid, reason), None))

    def flush_cache(self) -> bool:
        """Drop every cached prefix; refused (False) while requests hold cached pages."""
        return self._call(ipc.FlushCacheReq()).ok

    def stats(self) -> ipc.EngineStats:
        return self._call(ipc.StatsReq())

    def shutdown(self) -> None:
        self._closed = True
        self._inbox.put((ipc.ShutdownReq(), None))
        self._thread.join(timeout=10)
        self.worker.close()  # stops its background work (and a worker process, removing its sockets)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ----- front-end helpers -------------------------------------------------------------

    def _normalize_prompts(self, prompt, input_ids) -> tuple[list[Prompt], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt or input_ids")
        if input_ids is not None:
            if input_ids and isinstance(input_ids[0], list):
                return list(input_ids), False
            return [list(input_ids)], True
        if isinstance(prompt, str):
            return [prompt], True
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [prompt], True
        if isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
            if not prompt:
                raise ValueError("prompt list is empty")
            return list(prompt), False
        raise ValueError("prompt must be a string, a list of token ids, or a list of those")

    @staticmethod
    def _params_per_prompt(sampling_params, count: int) -> list[list[SamplingParams]]:
        """Each prompt's samples' params."""
        if isinstance(sampling_params, list):
            if len(sampling_params) != count:
                raise ValueError(f"got {len(sampling_params)} sampling_params for {count} prompts")
            return [_samples(p) for p in sampling_params]
        return [_samples(sampling_params)] * count

    def _stops(self, params: SamplingParams) -> StopRules:
        """The params' stop rules, checked (with their token ids) before the request is sent."""
        params.check_vocab(self.worker.model_config.vocab_size)
        return StopRules.build(params)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty", param="prompt")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = list(prompt)
        error = prompt_error(ids, self.worker.model_config.vocab_size, self.max_context)
        if error:
            raise RequestError(error, param="prompt")
        return ids

    def _submit(self, ids: list[int], params: SamplingParams) -> tuple[str, queue.Queue]:
        self._check_alive()
        rid = f"req-{next(self._ids)}"
        q: queue.Queue[ipc.ReqOutput] = queue.Queue()
        self._submitted[rid] = time.perf_counter()
        self._streams[rid] = q
        self._inbox.put((ipc.GenerateReq(rid, ids, params), None))
        return rid, q

    def _next(self, rid: str, q: queue.Queue) -> ipc.ReqOutput:
        while True:
            try:
                return q.get(timeout=1.0)
            except queue.Empty:
                self._check_alive()

    def _deltas(self, rid: str, q: queue.Queue, params: SamplingParams, stops: StopRules) -> Iterator[Delta]:
        """The request's Deltas, from the worker's outputs on its queue."""
        stream = OutputStream(self.tokenizer, params, stops)
        finished = False
        try:
            while not finished:
                out = self._next(rid, q)
                try:
                    delta = stream.add(out)
                except RequestError:
                    finished = True
                    if not out.finished:  # a stop regex that failed to match in time: the worker still runs it
                        self.abort(rid)
                    raise
                if delta is None:
                    continue
                if delta.finished:
                    finished = True
                    if stream.ends_in_front_end:
                        self.abort(rid, "stop")
                yield delta
        finally:
            if not finished:
                self.abort(rid)
            self._streams.pop(rid, None)
            self._submitted.pop(rid, None)

    def _collect(
        self, rid: str, q: queue.Queue, prompt_ids: list[int], params: SamplingParams, stops: StopRules
    ) -> RequestOutput:
        submitted = self._submitted[rid]
        out, ttft = Collected(), None
        for delta in self._deltas(rid, q, params, stops):
            if ttft is None and delta.token_ids:
                ttft = time.perf_counter() - submitted
            out.add(delta)
        last = out.last
        return RequestOutput(
            text=out.text,
            token_ids=out.token_ids,
            finish_reason=last.finish_reason,
            usage=last.usage,
            prompt_token_ids=prompt_ids,
            logprobs=out.logprobs if params.logprobs else None,
            top_logprobs=out.top_logprobs if params.logprobs and params.top_logprobs else None,
            prompt_logprobs=last.prompt_logprobs,
            prompt_top_logprobs=last.prompt_top_logprobs,
            ttft=ttft,
            e2e_latency=time.perf_counter() - submitted,
            matched_stop=last.matched_stop,
            rid=rid,
        )

    # ----- the worker thread -------------------------------------------------------------

    def _call(self, msg: ipc.ToWorker):
        self._check_alive()
        fut: Future = Future()
        self._inbox.put((msg, fut))
        return fut.result(timeout=60)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine's worker loop crashed: {self._dead!r}")
        if self._closed:
            raise EngineDeadError("the engine has been shut down")

    def _run(self, make: type[Worker] | type[WorkerProcessClient], built: Future) -> None:
        """Build the worker on this thread, then step it here. The thread that loads the model is
        the thread that runs it: torch's OpenMP pool belongs to the thread that first used it, and a
        second pool on 2 cores makes libgomp stop spinning between parallel regions (a batch-1
        decode step took 2.5x as long)."""
        try:
            self.worker = make(self.config)
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(None)
        self._loop()

    def _loop(self) -> None:
        try:
            while True:
                block = not self.worker.has_work()
                while True:
                    try:
                        msg, fut = self._inbox.get(block=block, timeout=None)
                    except queue.Empty:
                        break
                    block = False
                    if isinstance(msg, ipc.ShutdownReq):
                        return
                    reply = self.worker.handle(msg)
                    if fut is not None:
                        fut.set_result(reply)
                for out in self.worker.step():
                    stream = self._streams.get(out.rid)
                    if stream is not None:
                        stream.put(out)
        except BaseException as exc:  # report, don't hide: every waiting caller gets the error
            log.exception("worker loop crashed")
            self._dead = exc
            for rid, stream in list(self._streams.items()):
                stream.put(ipc.ReqOutput(rid, [], True, "error", error=f"worker crashed: {exc!r}"))


def _samples(value: SamplingParams | dict | None) -> list[SamplingParams]:
    """One prompt's samples: `n` of them for a dict with SGLang's `n` (sample j seeded seed + j)."""
    if not isinstance(value, dict) or "n" not in value:
        return [SamplingParams.from_any(value)]
    value = dict(value)
    n = value.pop("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"sampling_params.n must be an integer >= 1 (got {n!r})")
    params = SamplingParams.from_any(value)
    if params.seed is None:
        return [params] * n
    return [msgspec.structs.replace(params, seed=(params.seed + j + 2**63) % 2**64 - 2**63) for j in range(n)]
