"""Thinking apart from the answer: `<think>...</think>` goes to `reasoning_content`, as in SGLang's
and vLLM's reasoning parsers (DeepSeek's API field).

    deepseek-r1, qwen3-thinking   the reply starts inside the block (the chat template opened it); a
                                  leading <think> is skipped; without </think> it is all reasoning
    qwen3                         reasoning only if the reply starts with <think>; else all answer

The reasoning and the answer each lose their leading whitespace (`</think>\\n\\n` is not part of
the answer). `feed` takes the text piece by piece and holds back only what may be the start of a
tag, so a stream sends the same text as the whole reply split at once (`split`).
"""

from __future__ import annotations

from radixrt.server.settings import REASONING_PARSERS

PARSERS = REASONING_PARSERS
OPEN, CLOSE = "<think>", "</think>"
_STARTS_INSIDE = ("deepseek-r1", "qwen3-thinking")


class ReasoningParser:
    def __init__(self, name: str, starts_inside: bool | None = None) -> None:
        """`starts_inside`: whether the reply begins inside the block (default: as `name` says). A
        reply under a grammar is False: the grammar, not the template, decides what comes first."""
        if name not in PARSERS:
            raise ValueError(f"unknown reasoning parser {name!r}; expected one of {', '.join(PARSERS)}")
        inside = name in _STARTS_INSIDE if starts_inside is None else starts_inside
        # start: may open a block (qwen3); opening: inside one, maybe behind a <think>; thinking;
        # answer; plain: a reply without a block, passed through as it is
        self.state = "opening" if inside else "start"
        self.buffer = ""
        self._leading = True  # the current part's leading whitespace is still being dropped

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) that `text` makes final."""
        self.buffer += text
        reasoning = answer = ""
        while self.buffer:
            if self.state in ("start", "opening"):
                head = self.buffer.lstrip()
                if not head or OPEN.startswith(head) and head != OPEN:
                    break  # only whitespace, or part of a <think>: wait
                if head.startswith(OPEN):
                    self.state, self.buffer = "thinking", head[len(OPEN) :]
                else:
                    self.state = "thinking" if self.state == "opening" else "plain"
            elif self.state == "thinking":
                at = self.buffer.find(CLOSE)
                if at < 0:
                    ready, self.buffer = hold(self.buffer, CLOSE)
                    reasoning += self._strip(ready)
                    break
                reasoning += self._strip(self.buffer[:at])
                self.state, self.buffer, self._leading = "answer", self.buffer[at + len(CLOSE) :], True
            else:
                answer += self._strip(self.buffer) if self.state == "answer" else self.buffer
                self.buffer = ""
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """(reasoning, answer) still held once generation ended."""
        rest, self.buffer = self.buffer, ""
        if self.state in ("thinking", "opening"):
            return self._strip(rest), ""
        return "", rest if self.state in ("start", "plain") else self._strip(rest)

    def _strip(self, text: str) -> str:
        if self._leading:
            text = text.lstrip()
            self._leading = not text
        return text


def split(name: str, text: str, starts_inside: bool | None = None) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply."""
    parser = ReasoningParser(name, starts_inside)
    reasoning, answer = parser.feed(text)
    more, rest = parser.finish()
    return reasoning + more, answer + rest


def hold(text: str, marker: str) -> tuple[str, str]:
    """(text, '') split before its longest end that begins `marker`: that end may complete it."""
    keep = next((k for k in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:k])), 0)
    return text[: len(text) - keep], text[len(text) - keep :]
