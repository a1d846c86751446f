"""Prometheus metrics under SGLang's names, types, buckets and `model_name` label, plus radixrt's own.

An SGLang dashboard (its Grafana JSON) reads the `sglang:*` series unchanged: the request
counters and latency histograms are kept by the front end as requests finish (they survive a
worker restart); the gauges are refreshed from the worker's `EngineStats` at each scrape, and the
worker's cumulative totals (retractions, evictions) become counters there. The `radixrt_*` series
say what SGLang's do not: how requests ended, the page states, pins and the disk tier, the worker
process. Each server has its own registry, so several apps can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from radixrt import ipc

disable_created_metrics()  # the *_created series only add noise here

# SGLang's default buckets (sglang/srt/metrics/collector.py: TokenizerMetricsCollector).
TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400)
ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080, 0.100,
               0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000)  # fmt: skip
DISK_STATES = ("ready", "capacity", "written", "dropped", "corrupt")


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        r = self.registry = CollectorRegistry()
        label = ["model_name"]
        self.labels = {"model_name": model_name}

        def made(metric, extra: tuple[str, ...]):
            if not extra:  # the series exist (at zero) from the start, so a dashboard sees them at once
                metric.labels(model_name)
            return metric

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()):
            return made(Counter(name, doc, [*label, *extra], registry=r), extra)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()):
            return made(Gauge(name, doc, [*label, *extra], registry=r), extra)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return made(Histogram(name, doc, label, buckets=buckets, registry=r), ())

        # SGLang's names (its TokenizerMetricsCollector and SchedulerMetricsCollector)
        self.prompt_tokens = counter("sglang:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("sglang:generation_tokens", "Number of generation tokens processed.")
        self.cached_tokens = counter("sglang:cached_tokens", "Number of cached prompt tokens.")
        self.num_requests = counter("sglang:num_requests", "Number of requests processed.")
        self.num_so_requests = counter("sglang:num_so_requests", "Number of structured output requests processed.")
        self.num_aborted = counter("sglang:num_aborted_requests", "Number of requests aborted.")
        self.ttft = histogram("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)  # fmt: skip
        self.itl = histogram("sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)  # fmt: skip
        self.e2e = histogram("sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds",
                             E2E_BUCKETS)  # fmt: skip
        self.running = gauge("sglang:num_running_reqs", "The number of running requests.")
        self.queued = gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.")
        self.used_tokens = gauge("sglang:num_used_tokens", "The number of used tokens.")
        self.token_usage = gauge("sglang:token_usage", "The token usage.")
        self.max_tokens = gauge("sglang:max_total_num_tokens", "Maximum total number of tokens in the KV cache pool.")
        self.hit_rate = gauge("sglang:cache_hit_rate", "The prefix cache hit rate.")
        self.retracted = counter("sglang:num_retracted_requests", "Total number of retracted requests.")
        self.spec_accept_length = gauge("sglang:spec_accept_length",
                                        "The average acceptance length of speculative decoding.")  # fmt: skip
        # radixrt's own: what SGLang's series do not say
        self.requests = counter("radixrt_requests", "Generation requests by how they ended", ("finish_reason",))
        self.evicted = counter("radixrt_evicted_tokens", "Cached tokens dropped from the KV pool to make room")
        self.pages = gauge("radixrt_kv_pages", "KV pages by state", ("state",))
        self.pinned = gauge("radixrt_pinned_tokens", "Tokens held in memory by pinned prefixes")
        self.pins = gauge("radixrt_num_pinned_prefixes", "Pinned prefixes")
        self.disk = gauge("radixrt_kv_disk_pages", "Disk tier pages by state", ("state",))
        self.disk_hits = gauge("radixrt_kv_disk_hit_tokens", "Tokens loaded back from disk since the worker started")
        self.spec_verify = counter("radixrt_spec_verify_steps", "Decode steps of requests while speculation is on")
        self.spec_drafted = counter("radixrt_spec_draft_tokens", "Draft tokens verified")
        self.spec_accepted = counter("radixrt_spec_accepted_tokens", "Draft tokens the model agreed with (kept)")
        self.worker_up = gauge("radixrt_worker_up", "1 while the worker process is ready")
        self.worker_restarts = counter("radixrt_worker_restarts", "Times the worker process was restarted")
        # the worker's cumulative values at the last scrape
        self._worker_totals = dict.fromkeys(("retracted", "evicted", "verify", "drafted", "accepted"), 0)

    def _m(self, metric, *extra: str):
        return metric.labels(*self.labels.values(), *extra)

    def observe_tokens(self, seconds: float, count: int, first: bool) -> None:
        """`count` tokens arrived `seconds` after the request started (first: its time to first token)
        or after its previous ones (several at once, jump-forward, share the interval, as SGLang counts them)."""
        if first:
            self._m(self.ttft).observe(seconds)
            return
        for _ in range(count):
            self._m(self.itl).observe(seconds / count)

    def observe_finished(self, delta, seconds: float, structured: bool) -> None:
        usage = delta.usage
        self._m(self.prompt_tokens).inc(usage.prompt_tokens)
        self._m(self.generation_tokens).inc(usage.completion_tokens)
        self._m(self.cached_tokens).inc(usage.cached_tokens)
        self._m(self.num_requests).inc()
        if structured:
            self._m(self.num_so_requests).inc()
        self._m(self.e2e).observe(seconds)
        self.observe_ended(delta.finish_reason or "unknown")

    def observe_ended(self, reason: str) -> None:
        """A request ended: "stop", "length", "abort" (a client that left, /abort_request), "error", ..."""
        self._m(self.requests, reason).inc()
        if reason == "abort":
            self._m(self.num_aborted).inc()

    def set_worker_up(self, up: bool) -> None:
        self._m(self.worker_up).set(1 if up else 0)

    def worker_restarted(self) -> None:
        self._m(self.worker_restarts).inc()
        self._worker_totals = dict.fromkeys(self._worker_totals, 0)  # the new worker counts from zero

    def update_from_stats(self, s: ipc.EngineStats | None) -> None:
        """The gauges, and the worker's cumulative totals as counters, from a scrape's EngineStats."""
        if s is None:
            return
        total_tokens = s.total_pages * s.page_size
        used = (s.total_pages - s.free_pages - s.evictable_pages) * s.page_size  # SGLang: not free, not evictable
        self._m(self.running).set(s.num_running)
        self._m(self.queued).set(s.num_waiting)
        self._m(self.used_tokens).set(used)
        self._m(self.token_usage).set(used / total_tokens if total_tokens else 0.0)
        self._m(self.max_tokens).set(total_tokens)
        self._m(self.hit_rate).set(s.cache_hit_rate)
        for name, counter, value in (("retracted", self.retracted, s.num_preemptions),
                                     ("evicted", self.evicted, s.evicted_tokens),
                                     ("verify", self.spec_verify, s.spec_verify_ct),
                                     ("drafted", self.spec_drafted, s.spec_draft_tokens),
                                     ("accepted", self.spec_accepted, s.spec_accepted_tokens)):  # fmt: skip
            self._m(counter).inc(max(0, value - self._worker_totals[name]))
            self._worker_totals[name] = value
        if s.spec_verify_ct:  # tokens per verify step, over the worker's life: 1 + kept drafts per step
            self._m(self.spec_accept_length).set(1 + s.spec_accepted_tokens / s.spec_verify_ct)
        for state in ("free", "used", "cached", "evictable", "protected", "total"):
            self._m(self.pages, state).set(getattr(s, f"{state}_pages"))
        self._m(self.pinned).set(s.pinned_pages * s.page_size)
        self._m(self.pins).set(s.num_pins)
        disk = (s.disk_pages, s.disk_capacity_pages, s.disk_written_pages, s.disk_dropped_pages, s.disk_corrupt_pages)
        for state, value in zip(DISK_STATES, disk):
            self._m(self.disk, state).set(value)
        self._m(self.disk_hits).set(s.disk_hit_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
