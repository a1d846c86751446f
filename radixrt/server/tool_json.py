"""Tool calls written as JSON, parsed while the text grows: which calls exist, and how much of each
call's arguments is final.

A call is a JSON object {"name": <an offered tool>, "arguments" (or "parameters"): {...}}; a region
holds such objects, or lists of them, separated by whitespace, ',' or ';'. A call counts once its
name is complete. Its arguments are sent as `json.dumps(arguments)`, and only the part that can no
longer change: the text of the arguments parsed so far (partial-json-parser completes the open
strings and containers) without those completions, so every fragment sent is a prefix of the final
arguments. Complete values are parsed once (json's raw_decode); the value still growing is parsed
again as it grows, after it grew by 1/64 (so a region costs ~64 parses of its length in all).

    {"name": "get_weather", "arguments": {"city": "Par        parsed: {"city": "Par"}, open: 2 (", })
                                                              sendable: {"city": "Par
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from partial_json_parser import Allow
from partial_json_parser.core.exceptions import PartialJSON
from partial_json_parser.core.myelin import fix_fast

# Strings may be cut (their text so far is final); numbers and true/false/null only count when
# whole: "12" may become "123".
_ALLOW = Allow.STR | Allow.OBJ | Allow.ARR
_SEPARATORS = " \t\r\n;,"
_REPARSE_FRACTION = 64
_DECODER = json.JSONDecoder()


@dataclass
class Call:
    """One call as sent so far."""

    index: int
    id: str
    name: str
    arguments: str = ""  # the fragments sent, concatenated


class JsonCalls:
    """The calls in one region of JSON text, fed as it is generated. `feed` returns OpenAI
    tool_call deltas: {"index", "id", "type", "function": {"name", "arguments"}} when a call's name
    is complete, then {"index", "function": {"arguments": fragment}}."""

    def __init__(self, names: list[str], first_index: int) -> None:
        self.names = set(names)
        self.first_index = first_index
        self.text = ""
        self.calls: list[Call] = []
        self.broken = False  # malformed JSON: nothing after it counts
        self._done = 0  # text offset past the last complete value
        self._done_calls = 0  # calls in the complete values
        self._parsed = -1  # len(text) at the last parse

    def feed(self, text: str, final: bool = False) -> list[dict]:
        self.text += text
        pending = len(self.text) - self._done
        if self.broken or not final and len(self.text) - self._parsed < max(1, pending // _REPARSE_FRACTION):
            return []
        self._parsed = len(self.text)
        start = self._done_calls  # calls in values completed by earlier parses: final, sent already
        return self._emit(start, self._parse())

    def _parse(self) -> list[tuple[str, str]]:
        """(name, sendable arguments) of the calls after the values completed earlier, in order."""
        found: list[tuple[str, str]] = []
        pos = self._done
        while True:
            while pos < len(self.text) and self.text[pos] in _SEPARATORS:
                pos += 1
            if pos == len(self.text):
                return found
            try:
                value, end = _DECODER.raw_decode(self.text, pos)
            except ValueError:
                return found + self._partial(self.text[pos:])
            calls = self._calls(value, "", complete=True)
            self._done, self._done_calls, pos = end, self._done_calls + len(calls), end
            found += calls

    def _partial(self, text: str) -> list[tuple[str, str]]:
        try:
            head, tail = fix_fast(text, _ALLOW)
            value = json.loads(head + tail)
        except (PartialJSON, ValueError, AssertionError):  # fix_fast asserts on mismatched brackets
            self.broken = True
            return []
        return self._calls(value, tail, complete=False)

    def _calls(self, value: Any, tail: str, complete: bool) -> list[tuple[str, str]]:
        """The calls in one value: an object, or a list of them (the last one may be growing)."""
        items = value if isinstance(value, list) else [value]
        depth = 2 if isinstance(value, list) else 1  # open containers around a call's members
        out = []
        for i, item in enumerate(items):
            whole = complete or i < len(items) - 1
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or name not in self.names:
                continue  # not a call (or its name is still growing: it counts once complete)
            if not whole and list(item)[-1] == "name" and tail.startswith('"'):
                continue  # the name itself is cut: "get_w" is not get_weather yet
            out.append((name, _final(item) if whole else _sendable(item, tail, depth)))
        return out

    def _emit(self, start: int, found: list[tuple[str, str]]) -> list[dict]:
        deltas: list[dict] = []
        for k, (name, sendable) in enumerate(found, start):
            if k == len(self.calls):
                call = Call(self.first_index + k, f"call_{uuid.uuid4().hex[:24]}", name)
                self.calls.append(call)
                deltas.append({"index": call.index, "id": call.id, "type": "function",
                               "function": {"name": name, "arguments": ""}})
            call = self.calls[k]
            if len(sendable) > len(call.arguments) and sendable.startswith(call.arguments):
                fragment, call.arguments = sendable[len(call.arguments):], sendable
                if deltas and deltas[-1]["index"] == call.index:  # its header, sent in this same feed
                    deltas[-1]["function"]["arguments"] = fragment
                else:
                    deltas.append({"index": call.index, "function": {"arguments": fragment}})
        return deltas


def _arguments(call: dict) -> tuple[str | None, Any]:
    key = "arguments" if "arguments" in call else "parameters" if "parameters" in call else None
    return key, call.get(key, {}) if key else {}


def _final(call: dict) -> str:
    """The arguments of a complete call: its object as JSON (one given as a JSON string, decoded)."""
    args = _arguments(call)[1]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return json.dumps(args, ensure_ascii=False)


def _sendable(call: dict, tail: str, depth: int) -> str:
    """What of a growing call's arguments is final. `tail` closes everything open in the value,
    innermost first; `depth` of those are the call object and its list, not the arguments."""
    key, args = _arguments(call)
    if key is None:
        return ""
    open_inside = len(tail) - depth if list(call)[-1] == key else 0
    if open_inside <= 0:
        return _final(call)  # the arguments are closed; a later member is growing
    if not isinstance(args, dict):
        return ""  # a string or list still growing: sent once complete
    text = json.dumps(args, ensure_ascii=False)[:-open_inside]
    return text[:-1] if text and "\ud800" <= text[-1] <= "\udbff" else text  # half a surrogate pair
