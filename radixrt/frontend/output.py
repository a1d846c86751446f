"""From the worker's token ids to what a caller sees: one path for the Engine and the server.

The worker sends each request's new token ids step by step (`ipc.ReqOutput`). An
`OutputStream` per request turns them into `Delta`s: it detokenizes incrementally, holds
back text that may be the start of a stop string, and ends the request when one matches.
The worker does not see stop strings, so a match ends the request in the front end first:
`ends_in_front_end` tells the caller to abort the worker's copy (reason "stop"). Both the
in-process `Engine` (threads, `queue.Queue`) and the server's `TokenizerManager` (asyncio)
drive the same class; only how they wait for the next output differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from radixrt import ipc
from radixrt.frontend.detokenizer import IncrementalDetokenizer, StopRules
from radixrt.frontend.errors import RequestError
from radixrt.ipc import TopLogprobs
from radixrt.sampling_params import SamplingParams


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    spec_verify_ct: int = 0  # speculative decoding: verify steps, draft tokens verified, and accepted
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


@dataclass
class Delta:
    """What one request gained since the previous Delta; the last one has `finished` set."""

    text: str
    token_ids: list[int]
    usage: Usage
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "grammar_dead_end"
    matched_stop: int | str | None = None  # the stop token id, stop string or stop regex that ended it
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs] | None = None
    unenforced: list[str] | None = None  # lenient json_schema: the keywords not enforced (on the last Delta)


class OutputStream:
    def __init__(self, tokenizer, params: SamplingParams, stops: StopRules | None = None) -> None:
        """`stops`: `params.stop` and `params.stop_regex` already built (the server builds big ones
        off its event loop); built here when not given."""
        self.detok = IncrementalDetokenizer(
            tokenizer, stops or StopRules.build(params), params.skip_special_tokens, params.include_stop_str_in_output
        )
        self.ends_in_front_end = False  # a stop string matched before the worker finished
        self.unenforced: list[str] | None = None  # sent with the first tokens; reported on the last Delta

    def add(self, out: ipc.ReqOutput) -> Delta | None:
        """The Delta for one worker output (None when it adds nothing to show); raises RequestError
        when the worker refused or failed the request."""
        if out.error:
            raise RequestError(out.error, out.error_status)
        self.unenforced = out.unenforced or self.unenforced
        text = self.detok.add(out.new_token_ids)
        usage = Usage(out.prompt_tokens, out.completion_tokens, out.cached_tokens, out.spec_verify_ct,
                      out.spec_draft_tokens, out.spec_accepted_tokens)  # fmt: skip
        stop = self.detok.matched_stop
        if not out.finished and stop is None:
            if not (text or out.new_token_ids):
                return None
            return Delta(text, out.new_token_ids, usage, out.logprobs, out.top_logprobs)
        text += self.detok.flush()
        stop = self.detok.matched_stop  # flushing the held-back tail may complete one
        self.ends_in_front_end = stop is not None and not out.finished
        return Delta(
            text,
            out.new_token_ids,
            usage,
            out.logprobs,
            out.top_logprobs,
            finished=True,
            finish_reason="stop" if stop is not None else out.finish_reason,
            matched_stop=stop if stop is not None else out.matched_stop,
            prompt_logprobs=out.prompt_logprobs,
            prompt_top_logprobs=out.prompt_top_logprobs,
            unenforced=self.unenforced,
        )


@dataclass
class Collected:
    """A whole request's output, gathered from its Deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    last: Delta | None = None

    def add(self, d: Delta) -> None:
        self.text += d.text
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs or []
        self.top_logprobs += d.top_logprobs or []
        self.last = d
