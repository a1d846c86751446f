"""Tool calls in `/v1/chat/completions`: which tools the prompt sees, the grammar, how calls are read.

- `tool_choice` "required" or a named function: the reply is generated under `tool_call_schema`
  (JSON `{"name": ..., "arguments": {...}}`, arguments valid for that tool) and read as one call.
- "auto" (the default with tools): the tools go to the chat template, and calls the model writes in
  its family's format are read out of the text (tool_parser.py). The format is `--tool-call-parser`
  (SGLang's names), or, without it, guessed from the chat template; a template with no tool format
  (SmolLM2's) gets plain content.
- "none": the template still sees the tools; the reply is plain content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from radixrt.constrained.tools import tool_call_schema
from radixrt.frontend.errors import RequestError
from radixrt.server.protocol import ChatCompletionRequest
from radixrt.server.settings import TOOL_CALL_PARSERS
from radixrt.server.tool_parser import ToolCallParser

PARSERS = TOOL_CALL_PARSERS
# --tool-call-parser name -> the format tool_parser.py reads (Qwen 2.5 and 3 write Hermes' tags).
FORMATS = {"hermes": "hermes", "qwen": "hermes", "qwen25": "hermes", "qwen3_coder": "qwen3_coder",
           "llama3": "llama3", "mistral": "mistral", "pythonic": "pythonic"}


def template_convention(template: Any) -> str | None:
    """The tool-call format this chat template asks the model to write, or None."""
    if isinstance(template, dict):  # named templates ("default", "tool_use")
        template = "\n".join(str(t) for t in template.values())
    if not isinstance(template, str) or "tools" not in template:
        return None
    if "<function=" in template and "<parameter=" in template:
        return "qwen3_coder"
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if '"parameters": dictionary' in template or "<|python_tag|>" in template:
        return "llama3"
    return None


@dataclass
class ToolPlan:
    template_tools: list[dict] | None = None  # what the chat template gets
    tools: dict[str, dict] = field(default_factory=dict)  # the callable ones: name -> parameters schema
    schema: str | None = None  # forced call: the grammar (a JSON schema)
    style: str | None = None  # how calls are read: "forced", a tool_parser format, or None (plain content)

    def parser(self) -> ToolCallParser | None:
        """A streaming reader of this request's calls (None: the reply is plain content)."""
        return ToolCallParser(self.style, self.tools) if self.style else None


def plan_tools(body: ChatCompletionRequest, chat_template: Any, parser: str | None = None) -> ToolPlan:
    """Validate tools/tool_choice and decide how this request handles them; `parser` is the
    server's --tool-call-parser."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", 400, "tool_choice")
        return ToolPlan()
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise RequestError(f"tool names must be unique (got {names})", 400, "tools")
    plan = ToolPlan(template_tools=tools, tools={t["function"]["name"]: t["function"].get("parameters") or {}
                                                for t in tools})
    if choice == "none":
        return plan
    if choice in (None, "auto"):
        plan.style = FORMATS[parser] if parser else template_convention(chat_template)
        return plan
    if not isinstance(choice, str) and choice.function.name not in names:
        raise RequestError(f"tool_choice names {choice.function.name!r}, which is not among the tools {names}",
                           400, "tool_choice")
    try:
        wanted = choice if isinstance(choice, str) else choice.function.name
        plan.schema = json.dumps(tool_call_schema(tools, wanted))
    except ValueError as exc:
        raise RequestError(str(exc), 400, "tools") from None
    if not isinstance(choice, str):
        plan.tools = {wanted: plan.tools[wanted]}
    plan.style = "forced"
    return plan
