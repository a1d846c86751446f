"""Tool calls in `/v1/chat/completions`: which tools the prompt sees, the grammar, the parsing.

- `tool_choice` "required" or a named function: the reply is generated under
  `tool_call_schema` (JSON `{"name": ..., "arguments": {...}}`, arguments valid for that tool)
  and always comes back as one OpenAI tool call.
- "auto" (the default with tools): the tools go to the chat template, and calls the model
  writes in its template's convention are parsed out of the text:
  hermes (Qwen, Hermes) `<tool_call>{"name": ..., "arguments": ...}</tool_call>`,
  llama3 `{"name": ..., "parameters": ...}` as the whole reply,
  mistral `[TOOL_CALLS] [{"name": ..., "arguments": ...}]`.
  A template with none of these (SmolLM2's) gets plain content.
- "none": the template still sees the tools; the reply is plain content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from radixrt.constrained.tools import tool_call_schema
from radixrt.frontend.errors import RequestError
from radixrt.server.protocol import ChatCompletionRequest

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


def template_convention(template: Any) -> str | None:
    """How this chat template asks the model to write a tool call, or None."""
    if isinstance(template, dict):  # named templates ("default", "tool_use")
        template = "\n".join(str(t) for t in template.values())
    if not isinstance(template, str) or "tools" not in template:
        return None
    if HERMES_OPEN in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if '"parameters": dictionary' in template or "<|python_tag|>" in template:
        return "llama3"
    return None


@dataclass
class ToolPlan:
    template_tools: list[dict] | None = None  # what the chat template gets
    names: list[str] = field(default_factory=list)
    schema: str | None = None  # forced call: the grammar (a JSON schema)
    convention: str | None = None  # "auto": how to find calls in the text

    @property
    def active(self) -> bool:
        return self.schema is not None or self.convention is not None

    def parse(self, text: str) -> tuple[str, list[dict]]:
        """(content outside the calls, calls in OpenAI's shape); no calls: (text, [])."""
        if self.schema is not None:
            found = _json_calls(text, self.names)
            return ("", found) if found and len(found) == 1 else (text, [])
        if self.convention == "hermes":
            pieces = re.split(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S)
            calls = [_json_calls(body, self.names) for body in pieces[1::2]]
            if calls and all(c and len(c) == 1 for c in calls):
                return "".join(pieces[0::2]), [c[0] for c in calls]
        elif self.convention in ("llama3", "mistral"):
            found = _json_calls(text.strip().removeprefix("[TOOL_CALLS]"), self.names)
            if found:
                return "", found
        return text, []

    def message(self, text: str, reason: str | None) -> tuple[dict, str | None]:
        """The non-streamed assistant message and finish reason."""
        content, calls = self.parse(text) if self.active else (text, [])
        if not calls:
            return {"role": "assistant", "content": text}, reason
        return {"role": "assistant", "content": content.strip() or None, "tool_calls": calls}, "tool_calls"


def plan_tools(body: ChatCompletionRequest, chat_template: Any) -> ToolPlan:
    """Validate tools/tool_choice and decide how this request handles them."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", 400, "tool_choice")
        return ToolPlan()
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise RequestError(f"tool names must be unique (got {names})", 400, "tools")
    plan = ToolPlan(template_tools=tools, names=names)
    if choice == "none":
        return plan
    if choice in (None, "auto"):
        plan.convention = template_convention(chat_template)
        return plan
    if not isinstance(choice, str) and choice.function.name not in names:
        raise RequestError(f"tool_choice names {choice.function.name!r}, which is not among the tools {names}",
                           400, "tool_choice")
    try:
        wanted = choice if isinstance(choice, str) else choice.function.name
        plan.schema = json.dumps(tool_call_schema(tools, wanted))
        plan.names = names if isinstance(choice, str) else [wanted]
    except ValueError as exc:
        raise RequestError(str(exc), 400, "tools") from None
    return plan


def _json_calls(text: str, names: list[str]) -> list[dict] | None:
    """Calls from JSON objects (or lists of them) separated by whitespace, ';' or ','; None if
    the text is anything else or names an unknown tool."""
    decoder, calls, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return calls or None
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        for item in value if isinstance(value, list) else [value]:
            call = _call(item, names)
            if call is None:
                return None
            calls.append(call)


def _call(item: Any, names: list[str]) -> dict | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": item["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


class ToolStream:
    """Streaming: pass content through, hold back text that may be a tool call, parse at the end."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0  # chars of self.text already sent as content
        self.holding = plan.schema is not None  # a forced call: nothing is content

    def feed(self, delta: str) -> str:
        """Add generated text; return the part that is certainly content."""
        self.text += delta
        if self.holding:
            return ""
        if self.plan.convention == "hermes":
            start = self.text.find(HERMES_OPEN, self.sent)
            if start >= 0:
                self.holding = True
                return self._send(start)
            partial = next((k for k in range(len(HERMES_OPEN) - 1, 0, -1) if self.text.endswith(HERMES_OPEN[:k])), 0)
            return self._send(len(self.text) - partial)
        if self.plan.convention in ("llama3", "mistral") and self.sent == 0:
            head = self.text.lstrip()
            if not head:
                return ""
            if head[0] in "{[":  # the reply may be a call: hold it all
                self.holding = True
                return ""
            self.plan = ToolPlan()  # plain content from here on
        return self._send(len(self.text))

    def finish(self) -> tuple[str, list[dict]]:
        """(content not sent yet, tool calls) once the request finished."""
        content, calls = self.plan.parse(self.text) if self.plan.active else (self.text, [])
        return content[self.sent :], calls

    def _send(self, end: int) -> str:
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out
