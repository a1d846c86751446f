"""OpenAI: programs on any OpenAI-compatible server (OpenAI itself, vLLM, SGLang, `radixrt serve`).

Chat models (the default) get the conversation as messages, so `gen` must come right after
`assistant_begin()` (or inside `assistant(...)`) with no text of its own before it. Completion
models (`is_chat_model=False`) get the state's text as the prompt. `select` needs prompt
log-probs from `/v1/completions` (`echo=True, logprobs=0`); servers without them get a clear
error, as do regex/dtype constraints, which this API has no standard way to express.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from radixrt.lang.backend import scoring
from radixrt.lang.backend.base import BaseBackend
from radixrt.lang.chat_template import CHATML, ChatTemplate
from radixrt.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from radixrt.lang.errors import BackendError
from radixrt.lang.ir import SglSamplingParams

INSTRUCT_MODEL_NAMES = ["gpt-3.5-turbo-instruct"]


@dataclass
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def reset(self) -> None:
        self.prompt_tokens = self.completion_tokens = 0


class OpenAI(BaseBackend):
    """`OpenAI(model_name, base_url=..., api_key=...)`; other keyword args go to `openai.OpenAI`."""

    def __init__(
        self,
        model_name: str,
        is_chat_model: bool | None = None,
        chat_template: ChatTemplate | None = None,
        is_azure: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        import openai

        if kwargs.get("base_url") and "api_key" not in kwargs and not os.environ.get("OPENAI_API_KEY"):
            kwargs["api_key"] = "EMPTY"  # local servers often need no key; the client insists on one
        self._openai = openai
        self.client = openai.AzureOpenAI(*args, **kwargs) if is_azure else openai.OpenAI(*args, **kwargs)
        self.model_name = model_name
        self.is_chat_model = model_name not in INSTRUCT_MODEL_NAMES if is_chat_model is None else is_chat_model
        self.chat_template = chat_template or CHATML
        self.token_usage = TokenUsage()

    # ----- generation --------------------------------------------------------------------

    def generate(self, s, sampling_params: SglSamplingParams) -> tuple[str | list[str], Any]:
        """The text and its meta info; for n > 1, the n choices' texts and meta infos."""
        res = self._call(s, sampling_params, stream=False)
        self._count(res.usage)
        texts = [(c.message.content or "") if self.is_chat_model else c.text for c in res.choices]
        metas = [_meta(res.usage, c.finish_reason) for c in res.choices]
        return (texts, metas) if sampling_params.n > 1 else (texts[0], metas[0])

    def generate_stream(self, s, sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict[str, Any]]]:
        for chunk in self._call(s, sampling_params, stream=True):
            if chunk.usage is not None:
                self._count(chunk.usage)
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            text = (choice.delta.content if self.is_chat_model else choice.text) or ""
            meta = _meta(chunk.usage, choice.finish_reason) if choice.finish_reason else {}
            if text or meta:
                yield text, meta

    def _call(self, s, sp: SglSamplingParams, stream: bool):
        regex, json_schema, _ = sp.constraint()
        if regex is not None:
            raise NotImplementedError(
                "the OpenAI backend cannot constrain gen() with regex or dtype; use RuntimeEndpoint or an Engine"
            )
        kwargs: dict[str, Any] = {
            "model": self.model_name,
            "max_tokens": sp.max_new_tokens,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "frequency_penalty": sp.frequency_penalty,
            "presence_penalty": sp.presence_penalty,
            "stream": stream,
        }
        if sp.stop_list():
            kwargs["stop"] = sp.stop_list()
        if sp.n > 1:
            kwargs["n"] = sp.n
        if stream:
            kwargs["stream_options"] = {"include_usage": True}
        extra = {
            k: v
            for k, v in {
                "top_k": sp.top_k if sp.top_k > 0 else None,
                "min_p": sp.min_p or None,
                "min_tokens": sp.min_new_tokens or None,
                "ignore_eos": sp.ignore_eos or None,
                "stop_token_ids": list(sp.stop_token_ids) or None,
                "stop_regex": sp.stop_regex_list() or None,  # SGLang's and radixrt's extension
            }.items()
            if v is not None
        }
        if extra:
            kwargs["extra_body"] = extra  # vLLM / SGLang / radixrt extensions
        if json_schema is not None:
            schema = {"name": "output", "schema": json.loads(json_schema)}
            kwargs["response_format"] = {"type": "json_schema", "json_schema": schema}
        if not self.is_chat_model:
            return self._api(self.client.completions.create, prompt=s.text_, **kwargs)
        if s.cur_role != "assistant" or len(s.text_) != s.cur_role_begin_pos:
            raise RuntimeError(
                "with an OpenAI chat model, gen() must come right after assistant_begin() (or inside "
                "assistant(...)) with no text before it in the block; the messages are what gets sent"
            )
        return self._api(self.client.chat.completions.create, messages=s.messages_, **kwargs)

    # ----- select ------------------------------------------------------------------------

    def select(
        self, s, choices: list[str], temperature: float, choices_method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        scoring.check_select(choices, temperature)
        # Echo the prefix alone too: a choice's tokens are those after the longest run of tokens
        # it shares with the prefix's own tokens (as scoring.split_choices does with token ids).
        prefix, *echoed = self._echo_logprobs([s.text_] + [s.text_ + c for c in choices])
        conditional = [_tail(entries, _shared(prefix, entries)) for entries in echoed]
        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            alone = [_tail(entries, 0) for entries in self._echo_logprobs(list(choices))]
            # In context a choice may tokenize differently; compare position by position from its end.
            unconditional = [_align(u, len(c)) for u, c in zip(alone, conditional)]
        return scoring.decide(choices, choices_method, conditional, unconditional)

    def _echo_logprobs(self, prompts: list[str]) -> list[list[tuple[float | None, str]]]:
        """(logprob, token text) of every prompt token, from `/v1/completions` with echo."""
        res = self._api(
            self.client.completions.create,
            model=self.model_name,
            prompt=prompts,
            max_tokens=0,
            echo=True,
            logprobs=0,
            temperature=0,
        )
        out: list[Any] = [None] * len(prompts)
        for choice in res.choices:
            lp = choice.logprobs
            if lp is None or lp.token_logprobs is None or lp.tokens is None:
                raise BackendError(
                    "select() needs prompt log-probs (/v1/completions with echo=True, logprobs=0) "
                    f"and the server did not return them for model {self.model_name!r}"
                )
            out[choice.index] = list(zip(lp.token_logprobs, lp.tokens))
        return out

    def _api(self, create, **kwargs: Any):
        try:
            return create(**kwargs)
        except self._openai.APIConnectionError as exc:
            raise BackendError(f"cannot reach the OpenAI-compatible server at {self.client.base_url}: {exc}") from exc
        except self._openai.APIStatusError as exc:
            message = f"the OpenAI-compatible server refused the request ({exc.status_code}): {exc.message}"
            raise BackendError(message) from exc

    def _count(self, usage: Any) -> None:
        if usage is not None:
            self.token_usage.prompt_tokens += usage.prompt_tokens or 0
            self.token_usage.completion_tokens += usage.completion_tokens or 0


def _shared(prefix: list[tuple], entries: list[tuple]) -> int:
    """How many leading tokens `entries` has in common with `prefix` (at least one is left)."""
    n = 0
    while n < min(len(prefix), len(entries) - 1) and prefix[n][1] == entries[n][1]:
        n += 1
    return n


def _tail(entries: list[tuple[float | None, str]], start: int) -> list[list[Any]]:
    return [[lp if lp is not None else 0.0, None, tok] for lp, tok in entries[start:]]


def _align(entries: list[list[Any]], n: int) -> list[list[Any]]:
    return entries[len(entries) - n :] if len(entries) >= n else [[0.0, None, ""]] * (n - len(entries)) + entries


def _meta(usage: Any, finish_reason: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"finish_reason": {"type": finish_reason}}
    if usage is not None:
        details = getattr(usage, "prompt_tokens_details", None)
        meta.update(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=getattr(details, "cached_tokens", 0) or 0,
        )
    return meta
