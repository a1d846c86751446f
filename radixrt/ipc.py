"""Typed messages between the front end and the worker (msgspec; never pickle).

The same messages flow whether the worker runs inline (offline Engine, tests) or in its
own process behind ZMQ sockets. Only token ids, parameters and results cross: text stays
in the front end.
"""

from __future__ import annotations

import msgspec
import zmq

from radixrt.sampling_params import SamplingParams


class GenerateReq(msgspec.Struct, tag="generate"):
    rid: str
    input_ids: list[int]
    params: SamplingParams


class AbortReq(msgspec.Struct, tag="abort"):
    rid: str
    reason: str = "abort"  # "stop" when the front end saw a stop string: the request finished normally


class FlushCacheReq(msgspec.Struct, tag="flush_cache"):
    pass


class StatsReq(msgspec.Struct, tag="stats_req"):
    pass


class PinPrefixReq(msgspec.Struct, tag="pin_prefix"):
    """Keep the cached whole pages of this prefix in memory until unpinned (cache/pins.py)."""

    input_ids: list[int]
    cache_salt: str | None = None


class UnpinPrefixReq(msgspec.Struct, tag="unpin_prefix"):
    input_ids: list[int]
    cache_salt: str | None = None


class ShutdownReq(msgspec.Struct, tag="shutdown"):
    pass


TopLogprobs = list[tuple[int, float]]  # (token id, log-prob) of the most likely alternatives


class ReqOutput(msgspec.Struct):
    """What one request gained in one step (tokens appended since the last output)."""

    rid: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "grammar_dead_end" | "error"
    matched_stop: int | None = None  # the stop token id that ended it, if any
    error: str | None = None
    error_status: int = 400  # with `error`: the HTTP status it means (408 grammar timeout, 413 too large, ...)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # Speculative decoding so far (worker/speculative.py); SGLang's accept length is completion_tokens / verify_ct.
    spec_verify_ct: int = 0  # decode steps while speculation is on (each a verify step, with drafts or not)
    spec_draft_tokens: int = 0  # draft tokens verified
    spec_accepted_tokens: int = 0  # draft tokens the target agreed with
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs] | None = None
    # With the first tokens of a lenient json_schema request: JSON pointers of the keywords dropped.
    unenforced: list[str] | None = None


class StepOutputs(msgspec.Struct, tag="outputs"):
    outputs: list[ReqOutput]


class EngineStats(msgspec.Struct, tag="stats"):
    num_running: int
    num_waiting: int
    total_pages: int
    free_pages: int
    used_pages: int  # held by running requests, outside the cache
    cached_pages: int
    evictable_pages: int
    protected_pages: int
    page_size: int
    cache_hit_rate: float
    hit_tokens: int
    query_tokens: int
    evicted_tokens: int
    num_preemptions: int
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    num_finished: int
    pinned_pages: int = 0
    num_pins: int = 0
    max_pinned_pages: int = 0
    disk_pages: int = 0  # the disk tier (all zero without one): pages ready to load
    disk_capacity_pages: int = 0
    disk_hit_tokens: int = 0  # tokens loaded back from disk instead of recomputed
    disk_written_pages: int = 0
    disk_dropped_pages: int = 0  # not written (queue full, disk error)
    disk_corrupt_pages: int = 0  # failed their checksum on load: skipped
    disk_pending_io: int = 0
    spec_verify_ct: int = 0  # speculative decoding, over all requests (ReqOutput has the same per request)
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


class FlushCacheResult(msgspec.Struct, tag="flush_result"):
    ok: bool


class PinResult(msgspec.Struct, tag="pin_result"):
    ok: bool
    pinned_tokens: int = 0  # of this prefix (pin), or 0 (unpin)
    total_pinned_tokens: int = 0
    max_pinned_tokens: int = 0
    error: str | None = None


class WorkerReady(msgspec.Struct, tag="ready"):
    """The worker process's handshake: sent once, after the model is loaded (or failed to load)."""

    pid: int
    max_context: int = 0
    vocab_size: int = 0
    total_pages: int = 0
    page_size: int = 0
    dtype: str = ""  # what `--dtype auto` resolved to
    error: str | None = None


ToWorker = GenerateReq | AbortReq | FlushCacheReq | StatsReq | ShutdownReq | PinPrefixReq | UnpinPrefixReq
FromWorker = StepOutputs | EngineStats | FlushCacheResult | WorkerReady | PinResult

_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)
_encoder = msgspec.msgpack.Encoder()


def encode(msg: ToWorker | FromWorker) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(data: bytes) -> ToWorker:
    return _to_worker.decode(data)


def decode_from_worker(data: bytes) -> FromWorker:
    return _from_worker.decode(data)


def configure_socket(sock: zmq.Socket, linger_ms: int = 0) -> zmq.Socket:
    """Unbounded queues (a send never blocks or drops a message) and how long close() may flush."""
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, linger_ms)
    return sock
