"""Request bodies of the HTTP API as pydantic models, so the published OpenAPI schema is the real one.

Bounds live here (the schema shows them, and a bad value is refused with the field's name);
`SamplingParams.validate` checks the same rules again for the native `/generate` endpoint.
Unknown fields are ignored, as OpenAI clients send options we do not implement.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT32 = 2**31 - 1
MAX_N = 16  # choices per request

TokenId = Annotated[int, Field(ge=0, le=INT32)]
MaxTokens = Annotated[int, Field(ge=0, le=INT32)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingFields(_Body):
    """Options shared by chat and text completions (OpenAI names; extensions as in vLLM/SGLang)."""

    model: str | None = Field(None, description="the served model's id (see /v1/models); optional")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N, description="choices to generate; they share the prompt's cached prefix")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] | None = Field(
        None, description="up to 16 stop strings"
    )
    seed: Seed | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None
    # Extensions
    top_k: int | None = Field(None, ge=-1, le=INT32)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: MaxTokens = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = Field(None, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: MaxTokens | None = Field(None, description="default: the rest of the context")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="passed to the chat template; calls are not parsed")
    add_generation_prompt: bool = True


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of those"
    )
    max_tokens: MaxTokens | None = 16
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="top alternatives per token; 0 = the chosen token only")
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[TokenId]


class GenerateRequest(_Body):
    """The native (SGLang-shaped) request: text or token ids, SGLang sampling_params names."""

    text: str | list[str] | None = None
    input_ids: list[TokenId] | list[list[TokenId]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=20)
    logprob_start_len: int = Field(-1, ge=-1, le=INT32, description="-1: no prompt logprobs")
    return_text_in_logprobs: bool = False
