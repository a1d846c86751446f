"""Request bodies of the HTTP API as pydantic models, so the published OpenAPI schema is the real one.

Bounds live here (the schema shows them, and a bad value is refused with the field's name);
`SamplingParams.validate` checks the same rules again for the native `/generate` endpoint.
Every list is cheap to refuse: pydantic checks `max_length` before the items, and `fail_fast`
stops at the first bad item instead of collecting one error per item (a million bad items
would take seconds of the event loop). Limits set per server (stop strings) are checked in
server/common.py. A field a model does not declare is refused with a 400 that names it
(server/fields.py): an option silently ignored would change the output unseen.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from radixrt.frontend.chat_template import MAX_TEMPLATE_KWARGS
from radixrt.frontend.errors import RequestError
from radixrt.sampling_params import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_TOKENS, MAX_SALT_CHARS
from radixrt.server.fields import (
    GENERATE_DEFAULT_ONLY,
    GENERATE_UNSUPPORTED,
    OPENAI_DEFAULT_ONLY,
    OPENAI_UNSUPPORTED,
    StrictBody,
    field_error,
)

INT32 = 2**31 - 1
MAX_N = 16  # choices per request
MAX_PROMPTS = 256  # prompts in one completions or /generate request
MAX_MESSAGES = 4096  # a chat's messages: every template spends a few tokens on each
MAX_CONTENT_PARTS = 256  # text parts of one message
MAX_TOOLS = 128  # OpenAI's limit
MAX_RID_CHARS = 256  # a client's request id (rid, request_id, X-Request-Id): printable ASCII, no spaces
MAX_METADATA = 16  # OpenAI's limit on metadata pairs

TokenId = Annotated[int, Field(ge=0, le=INT32)]
TokenIds = Annotated[list[TokenId], Field(fail_fast=True)]
Prompts = Annotated[list[str], Field(max_length=MAX_PROMPTS, fail_fast=True)]
PromptIds = Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS, fail_fast=True)]
MaxTokens = Annotated[int, Field(ge=0, le=INT32)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
RequestId = Annotated[str, Field(min_length=1, max_length=MAX_RID_CHARS, pattern=r"^[!-~]+$")]
LogitBias = Annotated[
    dict[TokenId, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
    Field(max_length=MAX_LOGIT_BIAS_TOKENS, description="token id -> bias added to its logit, in [-100, 100]"),
]
StopList = Annotated[list[Annotated[str, Field(min_length=1)]], Field(fail_fast=True)]
TemplateKwargs = Annotated[
    dict[str, Any],
    Field(max_length=MAX_TEMPLATE_KWARGS, description="extra chat template variables, e.g. enable_thinking"),
]


class _Body(StrictBody):
    pass


class StreamOptions(_Body):
    include_usage: bool = False
    default_only = {"continuous_usage_stats": ((False,), "send usage with every chunk")}


class TextPart(_Body):
    type: str
    text: str | None = None
    unsupported = {name: "radixrt serves text-only models" for name in ("image_url", "input_audio", "file")}


class ChatMessage(_Body):
    unsupported = {"function_call": "OpenAI's deprecated form; send tool_calls", "audio": "text-only models"}

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS, fail_fast=True)] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS, fail_fast=True)
    tool_call_id: str | None = None


class JsonSchemaFormat(_Body):
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the reply must satisfy")
    strict: bool | None = Field(
        None,
        description="true: enforced exactly, or a 400 naming the keyword the engine cannot enforce; false or "
        "absent: such keywords are dropped and listed in the response's radixrt_unenforced",
    )


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs "json_schema": {"name": ..., "schema": {...}}')
        return self


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema for the arguments object")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "object") != "object":
            raise ValueError(f'must be a JSON schema of type "object" (got type {v.get("type")!r})')
        return v


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Body):
    class Name(_Body):
        name: str

    type: Literal["function"] = "function"
    function: Name


class SamplingFields(_Body):
    """Options shared by chat and text completions (OpenAI names; extensions as in vLLM/SGLang)."""

    default_only = OPENAI_DEFAULT_ONLY
    unsupported = OPENAI_UNSUPPORTED

    model: str | None = Field(None, description="the served model's id (see /v1/models); optional")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N, description="choices to generate; they share the prompt's cached prefix")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(fail_fast=True)] | None = Field(
        None, description="a stop string or a list of them (at most the server's --max-stop-strings, default 16)"
    )
    seed: Seed | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    user: str | None = Field(None, max_length=256, description="accepted; it does not change the output")
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=MAX_METADATA, description="accepted; stored nowhere"
    )
    safety_identifier: str | None = Field(None, max_length=256, description="accepted; it does not change the output")
    prompt_cache_key: str | None = Field(None, max_length=256, description="accepted; the radix cache needs no key")
    request_id: RequestId | None = Field(
        None,
        validation_alias=AliasChoices("request_id", "rid"),
        description="vLLM's (alias SGLang's rid): the response id is built from it, and /abort_request takes it; "
        "default: the X-Request-Id header, else a fresh one",
    )
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_SALT_CHARS,
        description="requests share cached prompt prefixes only with requests carrying the same salt (vLLM's field)",
    )
    # Extensions
    top_k: int | None = Field(None, ge=-1, le=INT32)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: MaxTokens = 0
    ignore_eos: bool = False
    stop_token_ids: TokenIds | None = None
    stop_regex: str | StopList | None = Field(
        None, description="SGLang's: generation ends where the output matches one of these regexes"
    )
    include_stop_str_in_output: bool = Field(False, description="vLLM's: keep the matched stop string in the text")
    no_stop_trim: bool = Field(False, description="SGLang's name for include_stop_str_in_output")
    skip_special_tokens: bool = True
    add_special_tokens: bool = Field(False, description="tokenize the prompt with the tokenizer's special tokens")
    # Constrained output: OpenAI's response_format, or one of radixrt/SGLang's fields (vLLM's names work too).
    response_format: ResponseFormat | None = None
    regex: str | None = Field(
        None, validation_alias=AliasChoices("regex", "guided_regex"), description="alias guided_regex"
    )
    ebnf: str | None = Field(
        None, validation_alias=AliasChoices("ebnf", "guided_grammar"), description="alias guided_grammar"
    )
    json_schema: str | dict[str, Any] | None = Field(
        None, validation_alias=AliasChoices("json_schema", "guided_json"), description="alias guided_json"
    )
    choices: list[str] | None = Field(
        None,
        min_length=1,
        fail_fast=True,
        validation_alias=AliasChoices("choices", "guided_choice"),
        description="alias guided_choice",
    )

    def grammar(self) -> tuple[dict[str, Any], str | None]:
        """The constraint asked for, as SamplingParams fields, and the request field that set it."""
        found: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", {"json_schema": '{"type": "object"}'}))
        elif rf is not None and rf.type == "json_schema":
            lenient = {} if rf.json_schema.strict else {"json_schema_strict": False}
            found.append(("response_format", {"json_schema": json.dumps(rf.json_schema.schema_), **lenient}))
        for name in ("regex", "ebnf", "json_schema", "choices"):
            value = getattr(self, name)
            if name == "json_schema" and isinstance(value, str):
                try:
                    json.loads(value)
                except ValueError as exc:
                    raise RequestError(f"json_schema is not valid JSON: {exc}", 400, "json_schema") from None
            elif name == "json_schema" and value is not None:
                value = json.dumps(value)
            if value is not None:
                found.append((name, {name: value}))
        if len(found) > 1:
            names = ", ".join(n for n, _ in found)
            raise RequestError(f"at most one output constraint per request; got {names}", 400, found[1][0])
        return (found[0][1], found[0][0]) if found else ({}, None)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES, fail_fast=True)
    max_tokens: MaxTokens | None = Field(None, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: MaxTokens | None = Field(None, description="default: the rest of the context")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(
        None, max_length=MAX_TOOLS, fail_fast=True, description="functions the model may call (see docs/server.md)"
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description=(
            '"auto" (default with tools), "none", "required", or {"type": "function", "function": {"name": ...}}'
        ),
    )
    parallel_tool_calls: bool | None = Field(None, description="accepted; a forced call is always a single one")
    separate_reasoning: bool = Field(
        True, description="with the server's --reasoning-parser: thinking in reasoning_content (false: in content)"
    )
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(
        False, description="vLLM's: continue the last (assistant) message instead of starting a new one"
    )
    chat_template_kwargs: TemplateKwargs | None = None
    default_only = {
        **OPENAI_DEFAULT_ONLY,
        "echo": ((False,), "echo the last message"),
        "best_of": ((1,), "pick the best of several samples (n samples are all returned)"),
        "stream_reasoning": ((True,), "hold reasoning back until it ends (it streams as it comes)"),
    }

    @model_validator(mode="before")
    @classmethod
    def _continue_or_prompt(cls, data: Any) -> Any:
        """continue_final_message leaves the last message open: no generation prompt after it (vLLM's rule)."""
        if isinstance(data, dict) and data.get("continue_final_message") is True:
            if data.get("add_generation_prompt"):
                raise field_error("add_generation_prompt", "continue_final_message continues the last message: "
                                  "add_generation_prompt must be false (or left out)")  # fmt: skip
            data = {**data, "add_generation_prompt": False}
        return data


class CompletionRequest(SamplingFields):
    prompt: str | Prompts | TokenIds | PromptIds = Field(
        description="a string, a list of strings, a list of token ids, or a list of those"
    )
    max_tokens: MaxTokens | None = 16
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="top alternatives per token; 0 = the chosen token only")
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class TokenizeRequest(_Body):
    """vLLM's /tokenize (and SGLang's): a prompt, or chat messages through the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES, fail_fast=True)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS, fail_fast=True)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: TemplateKwargs | None = None
    add_special_tokens: bool = False
    return_token_strs: bool = Field(False, description="also return each token's text, as token_strs")
    unsupported = {"chat_template": OPENAI_UNSUPPORTED["chat_template"]}


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: TokenIds


class GenerateRequest(_Body):
    """The native (SGLang-shaped) request: text or token ids, SGLang sampling_params names."""

    default_only = GENERATE_DEFAULT_ONLY
    unsupported = GENERATE_UNSUPPORTED

    rid: RequestId | Annotated[list[RequestId], Field(max_length=MAX_PROMPTS)] | None = Field(
        None, description="the request's id (a list: one per prompt); /abort_request takes it"
    )
    text: str | Prompts | None = None
    input_ids: TokenIds | PromptIds | None = None
    sampling_params: (
        dict[str, Any] | Annotated[list[dict[str, Any]], Field(max_length=MAX_PROMPTS, fail_fast=True)] | None
    ) = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=20)
    logprob_start_len: int = Field(-1, ge=-1, le=INT32, description="-1: no prompt logprobs")
    return_text_in_logprobs: bool = False
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_SALT_CHARS,
        description="for every prompt: shares cached prefixes only with requests carrying the same salt",
    )
