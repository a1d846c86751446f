"""EngineBackend: programs on an in-process `radixrt.Engine` (no server, no HTTP).

The Engine batches calls from all threads into shared forward passes and keeps every
prompt's KV in its radix cache, so concurrent branches and batch programs share prefixes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from radixrt.lang import chat_template
from radixrt.lang.backend import scoring
from radixrt.lang.backend.base import BaseBackend
from radixrt.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from radixrt.lang.ir import SglSamplingParams


class EngineBackend(BaseBackend):
    """`EngineBackend(engine)` or `EngineBackend(model=None, **engine_options)` (then it owns the engine)."""

    def __init__(self, engine: Any = None, **engine_options: Any) -> None:
        if engine is None:
            from radixrt.engine import Engine

            engine = Engine(**engine_options)
            self._owns_engine = True
        else:
            self._owns_engine = False
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.chat_template = chat_template.from_tokenizer(self.tokenizer)

    # ----- generation --------------------------------------------------------------------

    def generate(self, s, sampling_params: SglSamplingParams) -> tuple[str | list[str], Any]:
        """The text and its meta info; for n > 1, the n texts and their meta infos."""
        out = self.engine.generate(s.text_, _engine_params(sampling_params))
        if isinstance(out, list):
            return [o.text for o in out], [_meta_info(o, sampling_params) for o in out]
        return out.text, _meta_info(out, sampling_params)

    def generate_stream(self, s, sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict[str, Any]]]:
        params = _engine_params(sampling_params)
        completion_tokens = 0
        for chunk in self.engine.generate_stream(s.text_, params):
            completion_tokens += len(chunk.token_ids)
            meta: dict[str, Any] = {"completion_tokens": completion_tokens}
            if chunk.finished:
                meta = _usage_meta(chunk.usage, chunk.finish_reason)
            yield chunk.text, meta

    # ----- select ------------------------------------------------------------------------

    def select(
        self, s, choices: list[str], temperature: float, choices_method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        scoring.check_select(choices, temperature)
        items = scoring.split_choices(self._encode, s.text_, choices)
        outs = self.engine.generate(
            input_ids=[it.ids for it in items],
            sampling_params=[_score_params(it.start) for it in items],
        )
        conditional = [
            scoring.token_logprobs(out.prompt_logprobs[it.start :], it.choice_ids, self._decode)
            for it, out in zip(items, outs)
        ]
        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            outs = self.engine.generate(
                input_ids=[it.choice_ids for it in items], sampling_params=_score_params(0)
            )
            unconditional = [
                scoring.token_logprobs(out.prompt_logprobs, it.choice_ids, self._decode)
                for it, out in zip(items, outs)
            ]
        return scoring.decide(choices, choices_method, conditional, unconditional)

    # ----- cache -------------------------------------------------------------------------

    def cache_prefix(self, prefix_str: str) -> None:
        if prefix_str:
            self.engine.generate(prefix_str, {"max_new_tokens": 0})

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        stats = self.engine.stats()
        return {"model": self.engine.config.model, "max_context": self.engine.max_context, "stats": stats}

    def shutdown(self) -> None:
        if self._owns_engine:
            self.engine.shutdown()

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _engine_params(sp: SglSamplingParams) -> dict[str, Any]:
    params = sp.to_engine()
    if sp.return_logprob:
        params["logprobs"] = True
        params["top_logprobs"] = sp.top_logprobs_num or 0
        if sp.logprob_start_len is not None and sp.logprob_start_len >= 0:
            params["prompt_logprobs"] = True
            params["logprob_start_len"] = sp.logprob_start_len
    return params


def _score_params(start: int) -> dict[str, Any]:
    return {"max_new_tokens": 0, "temperature": 0.0, "prompt_logprobs": True, "logprob_start_len": start}


def _usage_meta(usage: Any, finish_reason: str | None) -> dict[str, Any]:
    """The meta_info of SGLang's native API (what `s.get_meta_info(name)` returns)."""
    meta: dict[str, Any] = {"finish_reason": {"type": finish_reason}}
    if usage is not None:
        meta.update(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
        )
    return meta


def _meta_info(out: Any, sp: SglSamplingParams) -> dict[str, Any]:
    meta = _usage_meta(out.usage, out.finish_reason)
    meta["output_ids"] = out.token_ids
    if sp.return_logprob:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(out.logprobs or [], out.token_ids)]
        if sp.top_logprobs_num:
            meta["output_top_logprobs"] = [[[lp, t, None] for t, lp in top] for top in out.top_logprobs or []]
        if out.prompt_logprobs is not None:
            start = sp.logprob_start_len or 0
            meta["input_token_logprobs"] = [
                [lp, t, None] for lp, t in zip(out.prompt_logprobs[start:], out.prompt_token_ids[start:])
            ]
    return meta
