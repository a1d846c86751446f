"""What a program appends to its state (`s += ...`): text, generation calls, roles, scopes.

Expressions are plain data; the interpreter (`interpreter.py`) gives them meaning. `+`
between expressions (or an expression and a string) builds an `ExprList`, as in SGLang:
`s += "Q: " + question + "\\nA:" + gen("answer")`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

import regex

from radixrt.lang.choices import ChoicesSamplingMethod

# The regexes SGLang uses for `gen(dtype=...)`: the value's text, then the whitespace that ends it.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""
DTYPE_REGEX = {int: REGEX_INT, float: REGEX_FLOAT, bool: REGEX_BOOL, str: REGEX_STR}
DTYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str, "string": str}


@dataclass
class SglSamplingParams:
    """A gen call's sampling parameters in SGLang's names; `run(...)` sets the defaults."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    n: int = 1  # samples: the variable holds a list of n texts, the state continues with the first
    stop: str | list[str] | tuple = ()
    stop_token_ids: list[int] | tuple = ()
    stop_regex: str | list[str] | tuple = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None
    dtype: type | str | None = None
    regex: str | None = None
    json_schema: str | None = None

    def override(self, changes: dict[str, Any]) -> "SglSamplingParams":
        """A copy with the gen call's explicitly given values on top."""
        return dataclasses.replace(self, **changes)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    def constraint(self) -> tuple[str | None, str | None, list[str]]:
        """(regex, json_schema, extra stop strings): `dtype` turns into SGLang's regex for it."""
        if self.dtype is None:
            return self.regex, self.json_schema, []
        dtype = resolve_dtype(self.dtype)
        if self.regex is not None:
            warnings.warn(f"gen() got both dtype and regex; dtype {dtype.__name__} wins", stacklevel=2)
        extra = [" ", "\n"] if dtype in (int, float) else []
        return DTYPE_REGEX[dtype], None, extra

    def to_engine(self) -> dict[str, Any]:
        """radixrt `SamplingParams` fields (also the body of the native `/generate`)."""
        regex, json_schema, extra_stop = self.constraint()
        params: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "stop": self.stop_list() + extra_stop,
            "stop_token_ids": list(self.stop_token_ids or ()),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "ignore_eos": self.ignore_eos,
        }
        if regex is not None:
            params["regex"] = regex
        if json_schema is not None:
            params["json_schema"] = json_schema
        if self.stop_regex:
            params["stop_regex"] = self.stop_regex_list()
        if self.n > 1:
            params["n"] = self.n
        return params

    def stop_regex_list(self) -> list[str]:
        return [self.stop_regex] if isinstance(self.stop_regex, str) else list(self.stop_regex or ())


def resolve_dtype(dtype: type | str) -> type:
    dtype = DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in DTYPE_REGEX:
        raise ValueError(f"gen() dtype must be int, float, bool or str (got {dtype!r})")
    return dtype


def schema_text(schema: Any) -> str:
    """json_schema as a string: SGLang takes a string; a dict or a pydantic model class works too."""
    if isinstance(schema, str):
        return schema
    if hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    return json.dumps(schema)


def check_regex(regex: str) -> None:
    try:
        re.compile(regex)
    except re.error as exc:
        raise ValueError(f"gen() regex {regex!r} does not compile: {exc}") from None


def check_stop_regex(stop_regex: str | list[str]) -> None:
    """Refuse at once what the engine would refuse later: a stop regex that does not compile."""
    for pattern in [stop_regex] if isinstance(stop_regex, str) else stop_regex:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"gen() stop_regex must be non-empty strings (got {pattern!r})")
        try:
            regex.compile(pattern)  # the engine's regex module (frontend/stop_regex.py)
        except regex.error as exc:
            raise ValueError(f"gen() stop_regex {pattern!r} does not compile: {exc}") from None


class Expr:
    """Anything `s += ...` accepts besides a string."""

    def __add__(self, other: "Expr | str") -> "ExprList":
        return ExprList(_items(self) + _items(as_expr(other)))

    def __radd__(self, other: "Expr | str") -> "ExprList":
        return ExprList(_items(as_expr(other)) + _items(self))


def as_expr(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise TypeError(
        f"cannot append {type(value).__name__} to a program state; use a string or a radixrt.lang expression"
    )


def _items(expr: Expr) -> list[Expr]:
    return list(expr.exprs) if isinstance(expr, ExprList) else [expr]


@dataclass(eq=False)
class Text(Expr):
    value: str


@dataclass(eq=False)
class ExprList(Expr):
    exprs: list[Expr]


@dataclass(eq=False)
class Gen(Expr):
    """Generate into variable `name`; `params` holds only the values the call gave explicitly."""

    name: str | None
    params: dict[str, Any]
    separate_reasoning: str | None = None  # a reasoning parser: the thinking goes to <name>_reasoning_content


@dataclass(eq=False)
class Select(Expr):
    name: str | None
    choices: list[str]
    temperature: float
    choices_method: ChoicesSamplingMethod


@dataclass(eq=False)
class RoleBegin(Expr):
    role: str


@dataclass(eq=False)
class RoleEnd(Expr):
    role: str


@dataclass(eq=False)
class VarScopeBegin(Expr):
    name: str


@dataclass(eq=False)
class VarScopeEnd(Expr):
    name: str


@dataclass(eq=False)
class CachePrefix(Expr):
    """Send the state's text to the backend so its KV is cached (before a fork)."""


@dataclass(eq=False)
class ConcatAndAppend(Expr):
    """`join("concate_and_append")`: append each branch's new text to the parent."""

    states: list[Any]


@dataclass(eq=False)
class EndOfProgram(Expr):
    """Queued after the program function returns: marks the state finished."""


def reasoning_name(name: str) -> str:
    """Where gen(name, separate_reasoning=...) puts the thinking (SGLang's name)."""
    return f"{name}_reasoning_content"


def named_exprs(expr: Expr) -> list[str]:
    """The variables an expression will set, so readers can wait for them before they exist."""
    if isinstance(expr, ExprList):
        return [name for e in expr.exprs for name in named_exprs(e)]
    if isinstance(expr, Gen) and expr.separate_reasoning and expr.name is not None:
        return [expr.name, reasoning_name(expr.name)]
    if isinstance(expr, (Gen, Select, VarScopeBegin)) and expr.name is not None:
        return [expr.name]
    return []
