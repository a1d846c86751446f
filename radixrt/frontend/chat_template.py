"""Chat messages -> prompt text through the model's own chat template (or `--chat-template`'s)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command line imports this module for BUILTIN_TEMPLATES: keep transformers out of it
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")
MAX_TEMPLATE_KWARGS = 32  # chat_template_kwargs entries per request
MAX_TEMPLATE_BYTES = 1 << 20  # a --chat-template file

# `--chat-template NAME`: SGLang's names for the formats models are most often trained on.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama-3-instruct": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
        " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}


def load_chat_template(spec: str) -> str:
    """The Jinja text `--chat-template` names: a built-in name or a file. Raises ValueError saying
    which, and a template that does not parse, at start-up rather than at the first chat request."""
    import jinja2

    if spec in BUILTIN_TEMPLATES:
        text = BUILTIN_TEMPLATES[spec]
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            names = ", ".join(BUILTIN_TEMPLATES)
            raise ValueError(f"--chat-template {spec!r} is neither a file nor a built-in template ({names})")
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise ValueError(f"--chat-template {spec!r} is over {MAX_TEMPLATE_BYTES:,} bytes")
        text = path.read_text()
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"--chat-template {spec!r} is not a valid Jinja template: {exc}") from None
    return text


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


def check_template_kwargs(kwargs: dict[str, Any] | None) -> None:
    """chat_template_kwargs become template variables; names that steer the renderer itself
    (tokenize, truncation, ...: transformers' own parameters) or the conversation are refused."""
    if not kwargs:
        return
    from transformers import PreTrainedTokenizerBase

    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise ValueError(f"chat_template_kwargs takes at most {MAX_TEMPLATE_KWARGS} entries (got {len(kwargs)})")
    reserved = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) | {"messages"}
    taken = sorted(k for k in kwargs if k in reserved or not str(k).isidentifier())
    if taken:
        raise ValueError(f"chat_template_kwargs cannot set {', '.join(taken)}: the server sets those itself")


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The prompt text for these messages, as the model was trained to see them.

    `continue_final_message` (vLLM's): the last message is left open, without its end-of-turn
    text, so the model continues it (a prefilled assistant reply); it takes no generation prompt.
    `template_kwargs` are extra template variables (e.g. `enable_thinking`).
    """
    messages = validate_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; use a completion prompt instead")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message continues the last message: it takes no generation prompt")
    check_template_kwargs(template_kwargs)
    kwargs = dict(template_kwargs or {}, **({"tools": tools} if tools else {}))
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        **kwargs,
    )
