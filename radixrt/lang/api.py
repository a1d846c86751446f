"""The primitives a program is written with; names and parameters follow SGLang's frontend.

    @function
    def qa(s, question):
        s += user(question)
        s += assistant(gen("answer", max_tokens=64))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from radixrt.lang import ir
from radixrt.lang.backend.registry import get_default_backend, resolve_backend, set_default_backend
from radixrt.lang.choices import ChoicesSamplingMethod, token_length_normalized
from radixrt.lang.program import SglFunction
from radixrt.server.reasoning import PARSERS as REASONING_PARSERS

__all__ = [
    "function", "gen", "gen_int", "gen_string", "select", "set_default_backend", "flush_cache",
    "get_server_info", "system", "user", "assistant", "system_begin", "system_end", "user_begin",
    "user_end", "assistant_begin", "assistant_end",
]  # fmt: skip


def function(func: Callable | None = None, num_api_spec_tokens: int | None = None):
    """Decorator: `@function` or `@function()`; the function's first argument is the program state."""
    if func is not None:
        return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)
    return lambda f: SglFunction(f, num_api_spec_tokens=num_api_spec_tokens)


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: type | str | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesSamplingMethod | None = None,
    regex: str | None = None,
    json_schema: Any = None,
    separate_reasoning: bool | str = False,
) -> ir.Expr:
    """Generate text into variable `name`. Unset parameters take the `run(...)` defaults.

    `dtype` (int, float, bool, str) constrains the text to that type's literal; `regex` and
    `json_schema` constrain it to a pattern or a JSON schema; `choices` makes this a `select`;
    `stop_regex` ends the text where it matches a regex. The variable holds the generated text
    (`int(s["n"])` for a number, as in SGLang); with `n > 1` it holds the list of n samples, the
    state continues with the first, and the meta info is a list too (SGLang's semantics).
    """
    if choices is not None:
        temperature = 0.0 if temperature is None else temperature
        return select(name, choices, temperature, choices_method or token_length_normalized)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"gen({name!r}) n must be an integer >= 1 (got {n!r})")
    if stop_regex is not None:
        ir.check_stop_regex(stop_regex)
    if dtype is not None:
        ir.resolve_dtype(dtype)
    if regex is not None:
        ir.check_regex(regex)
    if regex is not None and json_schema is not None:
        raise ValueError("gen() takes at most one of regex and json_schema")
    given = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": min_tokens,
        "n": n,
        "stop": stop,
        "stop_token_ids": stop_token_ids,
        "stop_regex": stop_regex,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty,
        "ignore_eos": ignore_eos,
        "return_logprob": return_logprob,
        "logprob_start_len": logprob_start_len,
        "top_logprobs_num": top_logprobs_num,
        "return_text_in_logprobs": return_text_in_logprobs,
        "dtype": dtype,
        "regex": regex,
        "json_schema": None if json_schema is None else ir.schema_text(json_schema),
    }
    return ir.Gen(name, {k: v for k, v in given.items() if v is not None}, _reasoning_parser(name, separate_reasoning))


def _reasoning_parser(name: str | None, separate_reasoning: bool | str) -> str | None:
    """gen(separate_reasoning=True) reads <think>...</think> at the start of the text (the qwen3
    parser); a parser's name picks another ("deepseek-r1": the text starts inside the block).
    The thinking goes to `<name>_reasoning_content`, the variable and the state keep the answer."""
    if separate_reasoning is False:
        return None
    parser = "qwen3" if separate_reasoning is True else separate_reasoning
    if parser not in REASONING_PARSERS:
        raise ValueError(f"gen({name!r}) separate_reasoning must be True or one of {', '.join(REASONING_PARSERS)} "
                         f"(got {separate_reasoning!r})")
    if name is None:
        raise ValueError("gen(separate_reasoning=...) needs a name: the reasoning goes to <name>_reasoning_content")
    return parser


def gen_int(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> ir.Expr:
    """`gen(..., dtype=int)`: an integer literal."""
    return gen(name, max_tokens, dtype=int, **kwargs)


def gen_string(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> ir.Expr:
    """`gen(..., dtype=str)`: a double-quoted string of letters, digits and spaces."""
    return gen(name, max_tokens, dtype=str, **kwargs)


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesSamplingMethod = token_length_normalized,
) -> ir.Expr:
    """Append the choice the model finds most likely here, scored by `choices_method`."""
    if not choices:
        raise ValueError(f"select({name!r}) needs a non-empty list of choices")
    if any(not isinstance(c, str) or not c for c in choices):
        raise ValueError(f"select({name!r}) choices must be non-empty strings (got {choices!r})")
    return ir.Select(name, list(choices), temperature, choices_method)


def _role(role: str, expr: ir.Expr | str | None) -> ir.ExprList:
    inner = [] if expr is None else [ir.as_expr(expr)]
    return ir.ExprList([ir.RoleBegin(role), *inner, ir.RoleEnd(role)])


def system(expr: ir.Expr | str | None = None) -> ir.ExprList:
    return _role("system", expr)


def user(expr: ir.Expr | str | None = None) -> ir.ExprList:
    return _role("user", expr)


def assistant(expr: ir.Expr | str | None = None) -> ir.ExprList:
    return _role("assistant", expr)


def system_begin() -> ir.Expr:
    return ir.RoleBegin("system")


def system_end() -> ir.Expr:
    return ir.RoleEnd("system")


def user_begin() -> ir.Expr:
    return ir.RoleBegin("user")


def user_end() -> ir.Expr:
    return ir.RoleEnd("user")


def assistant_begin() -> ir.Expr:
    return ir.RoleBegin("assistant")


def assistant_end() -> ir.Expr:
    return ir.RoleEnd("assistant")


def flush_cache(backend: Any = None, empty_cache: bool = True) -> bool:
    """Drop the backend's cached prefixes; False when there is no backend or it refused."""
    if backend is None and get_default_backend() is None:
        return False
    return resolve_backend(backend).flush_cache()


def get_server_info(backend: Any = None) -> dict[str, Any] | None:
    if backend is None and get_default_backend() is None:
        return None
    return resolve_backend(backend).get_server_info()
