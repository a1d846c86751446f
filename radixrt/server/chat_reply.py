"""One chat choice's generated text as OpenAI's assistant reply: reasoning, content, tool calls.

The text goes through the reasoning parser (`--reasoning-parser`: thinking to `reasoning_content`),
then the answer through the tool-call parser (calls to `tool_calls`); what is left is `content`.
`ReplyStream` does it piece by piece for a stream; `reply_message` feeds it the whole text, so a
streamed reply and a non-streamed one say the same.
"""

from __future__ import annotations

from radixrt.server.reasoning import ReasoningParser
from radixrt.server.tool_calls import ToolPlan


class ReplyStream:
    def __init__(self, tools: ToolPlan, reasoning: str | None, constrained: bool) -> None:
        """`reasoning`: the parser's name, or None (thinking stays in the content); `constrained`:
        the reply is generated under a grammar (it thinks only where it writes <think>)."""
        self.reasoning = ReasoningParser(reasoning, starts_inside=False if constrained else None) if reasoning else None
        self.tools = tools.parser()
        self.called = False  # a tool call was sent

    def feed(self, text: str) -> list[dict]:
        """The delta objects (`reasoning_content`, `content`, `tool_calls`) that `text` makes final."""
        thought = ""
        if self.reasoning is not None:
            thought, text = self.reasoning.feed(text)
        return self._deltas(thought, *self._calls(text, final=False))

    def finish(self, reason: str | None) -> tuple[list[dict], str | None]:
        """The deltas still held, and the finish reason ("tool_calls" if calls were made, unless the
        reply was cut short)."""
        thought, text = self.reasoning.finish() if self.reasoning is not None else ("", "")
        deltas = self._deltas(thought, *self._calls(text, final=True))
        return deltas, "tool_calls" if self.called and reason == "stop" else reason

    def _calls(self, text: str, final: bool) -> tuple[str, list[dict]]:
        if self.tools is None:
            return text, []
        content, calls = self.tools.feed(text)
        if final:
            rest, more = self.tools.finish()
            content, calls = content + rest, calls + more
        self.called = self.called or bool(calls)
        return content, calls

    @staticmethod
    def _deltas(thought: str, content: str, calls: list[dict]) -> list[dict]:
        out = [{"reasoning_content": thought}] if thought else []
        out += [{"content": content}] if content else []
        return out + ([{"tool_calls": calls}] if calls else [])


def reply_message(text: str, reason: str | None, tools: ToolPlan, reasoning: str | None,
                  constrained: bool) -> tuple[dict, str | None]:
    """The non-streamed assistant message and finish reason."""
    stream = ReplyStream(tools, reasoning, constrained)
    deltas = stream.feed(text)
    more, reason = stream.finish(reason)
    content, thought, calls = "", "", {}
    for delta in deltas + more:
        content += delta.get("content", "")
        thought += delta.get("reasoning_content", "")
        for call in delta.get("tool_calls", []):
            if "id" in call:
                calls[call["index"]] = {"id": call["id"], "type": "function", "function": dict(call["function"])}
            else:
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message.update(content=content.strip() or None, tool_calls=[calls[i] for i in sorted(calls)])
    if reasoning is not None:
        message["reasoning_content"] = thought or None
    return message, reason
