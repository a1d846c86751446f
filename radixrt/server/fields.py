"""A request field the server does not honour is refused, never ignored: a 400 names it.

An option a server silently drops changes the output without anyone noticing (a logit_bias that
does nothing, a beam search that is not one, a typo in `max_tokens`). So every request model
refuses a field it does not declare, with a message that names the nearest field it does take
and lists them all. Some fields are accepted at their default value only (`use_beam_search:
false`), and some have a reason of their own (`functions`: use `tools`). A field sent as null
counts as absent: clients send `"refusal": null` back with an assistant message.
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar

from pydantic import AliasChoices, BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

UNSUPPORTED_FIELD = "unsupported_field"  # pydantic error types whose context names the field (app.py reads it)
FIELD_ERROR = "field_error"

_names: dict[type, frozenset[str]] = {}


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # field -> (the values accepted: its default, what radixrt does not do)
    default_only: ClassVar[dict[str, tuple[tuple, str]]] = {}
    # field -> why it is refused
    unsupported: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        names = accepted_names(cls)
        if all(key in names for key in data):
            return data
        kept = {}
        for key, value in data.items():
            if key in names:
                kept[key] = value
            elif value is None or (key in cls.default_only and value in cls.default_only[key][0]):
                continue
            else:
                raise PydanticCustomError(UNSUPPORTED_FIELD, "{message}", {"field": key, "message": _why(cls, key)})
        return kept


def field_error(field: str, message: str) -> PydanticCustomError:
    """A validation error about `field`, raised where pydantic would not name it (a model validator)."""
    return PydanticCustomError(FIELD_ERROR, "{message}", {"field": field, "message": message})


def accepted_names(cls: type[BaseModel]) -> frozenset[str]:
    """The field names and aliases a model takes."""
    if cls not in _names:
        names = set()
        for name, f in cls.model_fields.items():
            names.add(f.alias or name)
            names.add(name)
            alias = f.validation_alias
            if isinstance(alias, AliasChoices):
                names.update(alias.choices)
            elif isinstance(alias, str):
                names.add(alias)
        _names[cls] = frozenset(n for n in names if isinstance(n, str))
    return _names[cls]


def _why(cls: type[StrictBody], key: str) -> str:
    if key in cls.default_only:
        values, reason = cls.default_only[key]
        return f"only {' or '.join(map(repr, values))} is supported: radixrt does not {reason}"
    if key in cls.unsupported:
        return f"not supported: {cls.unsupported[key]}"
    names = sorted(accepted_names(cls))
    close = difflib.get_close_matches(key, names, 1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"not supported by this server; {hint}supported here: {', '.join(names)}"


# Fields of OpenAI's, vLLM's and SGLang's chat/completions requests that radixrt takes at their default only.
OPENAI_DEFAULT_ONLY: dict[str, tuple[tuple, str]] = {
    "use_beam_search": ((False,), "run beam search"),
    "length_penalty": ((1.0,), "run beam search"),
    "priority": ((0,), "schedule by request priority"),
    "store": ((False,), "store completions"),
    "service_tier": (("auto", "default"), "offer service tiers"),
    "modalities": ((["text"],), "produce audio"),
    "spaces_between_special_tokens": ((True,), "change how special tokens are spaced"),
    "return_hidden_states": ((False,), "return hidden states"),
}
_TEXT_ONLY = "radixrt serves text-only models"
_NO_PROCESSORS = "radixrt runs no custom logit processors (logit_bias is supported)"
OPENAI_UNSUPPORTED: dict[str, str] = {
    "functions": "OpenAI's deprecated form; send tools",
    "function_call": "OpenAI's deprecated form; send tool_choice",
    "audio": _TEXT_ONLY,
    "mm_processor_kwargs": _TEXT_ONLY,
    "prediction": "radixrt does not take predicted outputs",
    "web_search_options": "radixrt has no web search",
    "logits_processors": _NO_PROCESSORS,
    "custom_logit_processor": _NO_PROCESSORS,
    "custom_params": f"they feed custom logit processors; {_NO_PROCESSORS}",
    "allowed_token_ids": "express it with logit_bias, regex or choices",
    "bad_words": "express it with stop or logit_bias (-100 bans a token)",
    "truncate_prompt_tokens": "radixrt does not cut prompts: a prompt longer than the context is a 400",
    "prompt_logprobs": "use /v1/completions with echo and logprobs, or /generate with logprob_start_len",
    "return_tokens_as_token_ids": "log-probs name tokens by their text",
    "chat_template": "a template per request is refused; start the server with --chat-template",
    "documents": "pass them in the messages (or as chat_template_kwargs)",
    "guided_decoding_backend": "the server's --grammar-backend decides",
    "guided_whitespace_pattern": "the grammar backend's JSON whitespace rules apply",
    "lora_path": "radixrt serves no LoRA adapters",
    "session_params": "radixrt has no sessions; the prefix cache finds a conversation's history by itself",
    "kv_transfer_params": "radixrt does not disaggregate prefill and decode",
    "vllm_xargs": "radixrt runs no request extensions",
}
# The same for SGLang's native /generate body (its GenerateReqInput).
GENERATE_DEFAULT_ONLY: dict[str, tuple[tuple, str]] = {
    "log_metrics": ((True,), "leave requests out of the metrics"),
    "return_hidden_states": ((False,), "return hidden states"),
    "priority": ((0,), "schedule by request priority"),
    "background": ((False,), "run requests in the background"),
    "no_logs": ((False,), "leave requests out of the logs"),
    "return_bytes": ((False,), "return text as bytes"),
    "return_entropy": ((False,), "return the sampling entropy"),
}
GENERATE_UNSUPPORTED: dict[str, str] = {
    **{name: _TEXT_ONLY for name in ("image_data", "audio_data", "video_data", "input_embeds", "modalities")},
    "token_ids_logprob": "ask for top_logprobs_num alternatives instead",
    "custom_logit_processor": _NO_PROCESSORS,
    "lora_path": "radixrt serves no LoRA adapters",
    "session_params": "radixrt has no sessions; the prefix cache finds a conversation's history by itself",
    **{name: "radixrt does not disaggregate prefill and decode" for name in
       ("bootstrap_host", "bootstrap_port", "bootstrap_room")},  # fmt: skip
    "data_parallel_rank": "sglang-router picks the replica (radixrt serve --dp)",
}
