"""Tool calls out of generated text, as it streams: where each model family writes its calls.

    forced       the whole reply is {"name": ..., "arguments": {...}}       (tool_choice required / named)
    hermes       <tool_call>{"name": ..., "arguments": ...}</tool_call>      (Hermes; Qwen 2.5 and 3: qwen, qwen25)
    llama3       the whole reply is {"name": ..., "parameters": ...}         (several separated by ';')
    mistral      [TOOL_CALLS] [{"name": ..., "arguments": ...}, ...]
    qwen3_coder  <tool_call><function=f><parameter=p>value</parameter></function></tool_call>
    pythonic     the whole reply is [f(a=1, b="x"), g()]

`ToolCallParser.feed` takes the text piece by piece and returns what may be sent now: content (text
outside the calls; a piece that may begin a call is held back) and OpenAI tool_call deltas. JSON
calls stream their arguments as they become final (tool_json.py); qwen3_coder and pythonic calls
arrive whole when their block ends. A region that holds no call to an offered tool is content. The
non-streamed reply is the same parser fed the whole text at once (chat_reply.py), so both agree.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any

from radixrt.server.reasoning import hold
from radixrt.server.tool_json import JsonCalls

# name -> (opener, closer) of the call blocks inside a reply, or the prefixes and first characters
# of a reply that is all calls.
_TAGGED = {"hermes": ("<tool_call>", "</tool_call>"), "qwen3_coder": ("<tool_call>", "</tool_call>")}
_WHOLE = {"llama3": (("<|python_tag|>",), "{["), "mistral": (("[TOOL_CALLS]",), "{["), "pythonic": ((), "[")}
STYLES = ("forced", *_TAGGED, *_WHOLE)


class ToolCallParser:
    def __init__(self, style: str, tools: dict[str, dict]) -> None:
        """`tools`: the offered tools' names and parameter schemas."""
        if style not in STYLES:
            raise ValueError(f"unknown tool-call style {style!r}; expected one of {', '.join(STYLES)}")
        self.style, self.tools = style, tools
        self.state = "region" if style == "forced" else "start" if style in _WHOLE else "content"
        self.buffer = ""  # text not yet given out
        self.raw = ""  # the current region's text as written (content if it holds no call)
        self.count = 0  # calls so far
        self._region: JsonCalls | None = JsonCalls(list(tools), 0) if style == "forced" else None

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content, tool_call deltas) that `text` makes final."""
        self.buffer += text
        content, deltas = "", []
        while True:
            if self.state == "content":
                opener = _TAGGED[self.style][0]
                at = self.buffer.find(opener)
                if at < 0:
                    ready, self.buffer = hold(self.buffer, opener)
                    return content + ready, deltas
                content += self.buffer[:at]
                self._open(self.buffer[at : at + len(opener)])
                self.buffer = self.buffer[at + len(opener) :]
            elif self.state == "region" and self.style in _TAGGED:
                closer = _TAGGED[self.style][1]
                at = self.buffer.find(closer)
                if at < 0:
                    ready, self.buffer = hold(self.buffer, closer)
                    return content, deltas + self._region_feed(ready)
                deltas += self._region_feed(self.buffer[:at])
                self.raw += closer
                self.buffer = self.buffer[at + len(closer) :]
                closing_content, closing = self._close()
                content, deltas = content + closing_content, deltas + closing
                self.state = "content"
            elif self.state == "region":
                deltas += self._region_feed(self.buffer)
                self.buffer = ""
                return content, deltas
            elif self.state == "start":
                if not self._start():
                    return content, deltas
            else:  # "plain": a reply that is not a call
                content, self.buffer = content + self.buffer, ""
                return content, deltas

    def finish(self) -> tuple[str, list[dict]]:
        """(content, tool_call deltas) still held once generation ended."""
        content, deltas = "", []
        if self.state == "region":
            deltas = self._region_feed(self.buffer)
            content, closing = self._close()
            deltas += closing
        else:
            content = self.buffer
        self.buffer = ""
        return content, deltas

    # ---- regions --------------------------------------------------------------------------------
    def _start(self) -> bool:
        """A reply that is all calls or none: decide from its first characters (False: wait)."""
        prefixes, openers = _WHOLE[self.style]
        head = self.buffer.lstrip()
        if not head:
            return False
        for prefix in prefixes:
            if head.startswith(prefix):
                self._open(self.buffer[: len(self.buffer) - len(head) + len(prefix)])
                self.buffer = head[len(prefix) :]
                return True
            if prefix.startswith(head):
                return False
        if head[0] in openers:
            self._open(self.buffer[: len(self.buffer) - len(head)])
            self.buffer = head
        else:
            self.state = "plain"
        return True

    def _open(self, opener: str) -> None:
        self.state, self.raw = "region", opener
        self._region = JsonCalls(list(self.tools), self.count) if self.style not in _WHOLE_TEXT else None

    def _region_feed(self, text: str) -> list[dict]:
        self.raw += text
        return self._region.feed(text) if self._region is not None else []

    def _close(self) -> tuple[str, list[dict]]:
        """End the region: its remaining deltas, or its text as content if it held no call."""
        if self._region is not None:
            deltas = self._region.feed("", final=True)
            made = len(self._region.calls)
        else:
            body = self.raw[len(_TAGGED[self.style][0]) :].removesuffix(_TAGGED[self.style][1]) \
                if self.style in _TAGGED else self.raw
            calls = _WHOLE_TEXT[self.style](body, self.tools)
            deltas = [{"index": self.count + k, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                       "function": {"name": name, "arguments": arguments}} for k, (name, arguments) in enumerate(calls)]
            made = len(calls)
        self.count += made
        content = "" if made else self.raw
        self.raw, self._region = "", None
        return content, deltas


# ---- the formats that are not JSON: parsed when their block is complete ---------------------------
def _qwen3_coder(text: str, tools: dict[str, dict]) -> list[tuple[str, str]]:
    """<function=name><parameter=key>value</parameter>...</function>; each value typed by the tool's
    schema (text for strings, else read as JSON where it parses)."""
    calls = []
    for function in re.finditer(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", text, re.S):
        name = function.group(1).strip()
        if name not in tools:
            continue
        properties = (tools[name] or {}).get("properties") or {}
        args = {}
        for param in re.finditer(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", function.group(2),
                                 re.S):
            key, value = param.group(1).strip(), param.group(2).strip("\n")
            args[key] = _typed(value, properties.get(key) if isinstance(properties, dict) else None)
        calls.append((name, json.dumps(args, ensure_ascii=False)))
    return calls


def _typed(value: str, schema: Any) -> Any:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind in (None, "string") or isinstance(kind, list) and "string" in kind:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _pythonic(text: str, tools: dict[str, dict]) -> list[tuple[str, str]]:
    """[f(a=1, b="x"), g()]: calls with keyword arguments whose values are Python literals."""
    try:
        body = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    calls = []
    for node in body.elts if isinstance(body, ast.List) else [body]:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in tools) or node.args:
            continue
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
            calls.append((node.func.id, json.dumps(args, ensure_ascii=False)))
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            continue
    return calls


_WHOLE_TEXT = {"qwen3_coder": _qwen3_coder, "pythonic": _pythonic}
