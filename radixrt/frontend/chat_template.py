"""Chat messages -> prompt text through the model's own chat template."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the OpenAI message shape; raise ValueError naming the bad message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)} (got {m.get('role')!r})")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise ValueError(f"messages[{i}].content is missing")
    return [dict(m, content=_text_of(m.get("content"))) for m in messages]


def _text_of(content: Any) -> str:
    """OpenAI allows content as a string or a list of {'type': 'text', 'text': ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError("only text content parts are supported")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise ValueError("message content must be a string or a list of text parts")


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text for these messages, as the model was trained to see them."""
    messages = validate_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; use a completion prompt instead")
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
