"""From a request's spec to the text an engine compiles: all the Python work on untrusted input.

    json_schema  parse, size-check (limits.py), normalize, refuse what the engine ignores (schema.py)
    json_schema_lenient   the same, but drop what the engine ignores and say so (lenient.py)
    regex        size-check; \\d \\w \\s -> ASCII classes (regex.py)
    choices      parse, size-check, spell in the engine's grammar syntax
    ebnf         as given (llguidance: converted to Lark)
    json_object  the engine's "any JSON object"

then per engine: llguidance translates schemas/regexes/Lark into its grammar text and validates
it (its full grammar compile, without the tokenizer); outlines translates schemas to a regex.
Several of these hold the GIL for as long as they run, so compiler.py runs `prepare` in a
preparation process (sandbox.py) under the time budget, and the worker only builds the engine
object from the returned text, which the engines do with the GIL released.

No torch here: a preparation process imports only this, schema.py, lenient.py, regex.py and the
engine's package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

from .errors import GrammarError, GrammarTooLarge, one_line
from .lenient import regular_pattern, relax, report
from .limits import GrammarLimits, check_choices, check_schema, check_spec
from .regex import ascii_classes
from .schema import check, normalize

try:
    import llguidance as llg
except ImportError:  # optional: get_backend("llguidance") names the pip command
    llg = None
try:
    from outlines_core import json_schema as outlines_json
except ImportError:  # optional, as above
    outlines_json = None

LENIENT = "json_schema_lenient"  # OpenAI's json_schema with strict false: best effort, reported
KINDS = ("json_schema", LENIENT, "json_object", "regex", "ebnf", "choices")

# llguidance: compact JSON with the usual separators; unknown keywords are errors, not ignored.
_LLGUIDANCE_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                           "lenient": False}
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


@dataclass(frozen=True)
class Prepared:
    """What the engine compiles and, for a lenient schema, the JSON pointers of the keywords
    dropped to get there (lenient.report: bounded)."""

    text: str
    unenforced: tuple[str, ...] = ()


def prepare(backend: str, kind: str, spec: str, preprocess: bool = True,
            limits: GrammarLimits = GrammarLimits()) -> Prepared:
    """What `backend` compiles for `spec`; GrammarError (or GrammarTooLarge) names what is wrong.

    `preprocess=False` hands schemas and regexes to the engine untouched (benchmarks; a lenient
    schema then drops nothing); the size limits apply either way."""
    check_request(kind, spec, limits)
    try:
        if kind in ("json_schema", LENIENT):
            return _prepare_schema(kind, spec, backend, preprocess, limits)
        return Prepared(_ENGINES.get(backend, _plain)(kind, spec, preprocess, limits))
    except GrammarError:
        raise
    except RecursionError:
        raise GrammarTooLarge(f"{_field(kind)}: nested too deeply to parse") from None
    except MemoryError:  # in a preparation process: over GrammarLimits.memory_mb
        raise GrammarTooLarge(f"{_field(kind)}: preparing it needs more memory than the limit of "
                              f"{limits.memory_mb:,} MB (memory_mb)") from None
    except Exception as exc:  # the engines raise ValueError/RuntimeError with their own text
        raise GrammarError(f"{backend}: invalid {_field(kind)}: {one_line(exc)}") from exc


def _prepare_schema(kind: str, spec: str, backend: str, preprocess: bool, limits: GrammarLimits) -> Prepared:
    lenient = kind == LENIENT
    try:
        text, dropped = _schema_text(spec, backend, preprocess, limits, lenient)
        return Prepared(_ENGINES.get(backend, _plain)("json_schema", text, preprocess, limits), report(dropped))
    except Exception as exc:
        named = exc if lenient or not preprocess else _named(exc, spec, backend, limits)
        if named is exc:
            raise
        raise named from exc


def _named(exc: Exception, spec: str, backend: str, limits: GrammarLimits) -> Exception:
    """A strict schema the engine refuses: lead with the first keyword a lenient one would drop,
    and where; the engine's own words follow. Other errors (too large, invalid) pass unchanged."""
    if type(exc) not in (GrammarError, ValueError, RuntimeError):
        return exc
    try:
        text, dropped = _schema_text(spec, backend, True, limits, lenient=True)
        _ENGINES.get(backend, _plain)("json_schema", text, True, limits)
    except Exception:  # invalid for another reason too: the engine's message says it
        return exc
    if not dropped:
        return exc
    where, _, key = dropped[0].rpartition("/")
    more = f" (and {len(dropped) - 1} more)" if len(dropped) > 1 else ""
    words = str(exc) if isinstance(exc, GrammarError) else f"{backend}: {one_line(exc)}"
    return GrammarError(f"{backend} does not enforce JSON schema keyword {key!r} at {where or '/'}{more}; "
                        f"a schema that is not strict drops it and says so. {words}")


def _field(kind: str) -> str:
    """The request field a kind comes from, for messages."""
    return "json_schema" if kind == LENIENT else kind


def check_request(kind: str, spec: str, limits: GrammarLimits) -> None:
    """What needs no parsing: the kind and the spec's length. O(1), so callers refuse before queueing."""
    if kind not in KINDS:
        raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {', '.join(KINDS)}")
    check_spec(kind, spec, limits)


def _schema_text(spec: str, backend: str, preprocess: bool, limits: GrammarLimits,
                 lenient: bool) -> tuple[str, list[str]]:
    """The schema to hand the engine, normalized, and refused if it uses a keyword the engine
    would ignore (schema.py); lenient, such keywords are dropped instead and listed (lenient.py)."""
    schema = _parse_schema(spec)
    check_schema(schema, limits)
    if not preprocess:
        return spec, []
    dropped: list[str] = []
    if lenient:
        accepts = _llguidance_accepts if backend == "llguidance" else None
        schema, dropped = relax(schema, backend, _pattern_check(backend), accepts)
    else:
        schema = normalize(schema)
    check(schema, backend)
    return json.dumps(schema), dropped


def _pattern_check(backend: str):
    """Whether the engine compiles a pattern, asked once per distinct pattern of a schema."""
    seen: dict[str, bool] = {}

    def ok(pattern: str) -> bool:
        if pattern not in seen:
            seen[pattern] = regular_pattern(pattern) and (backend != "llguidance" or _llguidance_regex_ok(pattern))
        return seen[pattern]

    return ok


def _llguidance_accepts(schema: dict | bool) -> bool:
    grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_LLGUIDANCE_JSON_OPTIONS)
    return not llg.LLMatcher.validate_grammar_with_warnings(grammar)[0]


def _llguidance_regex_ok(pattern: str) -> bool:
    is_error, _ = llg.LLMatcher.validate_grammar_with_warnings(llg.LLMatcher.grammar_from_regex(pattern))
    return not is_error


def _regex_text(spec: str, preprocess: bool) -> str:
    return ascii_classes(spec) if preprocess else spec


def _parse_schema(spec: str) -> dict | bool:
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"json_schema must be a JSON object, not {type(schema).__name__}")
    return schema


def _parse_choices(spec: str, limits: GrammarLimits) -> list[str]:
    """`choices` specs are a JSON list of non-empty strings."""
    try:
        choices = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"choices must be a JSON list of strings: {exc}") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choices must be a non-empty JSON list of non-empty strings")
    check_choices(choices, limits)
    return choices


# ---- per engine ---------------------------------------------------------------------------------
def _plain(kind: str, spec: str, preprocess: bool, limits: GrammarLimits) -> str:
    """Schemas, regexes and GBNF as text (xgrammar compiles these itself); choices as GBNF.
    For json_schema, `spec` is the prepared schema (here and below)."""
    if kind == "regex":
        return _regex_text(spec, preprocess)
    if kind == "choices":
        return "root ::= " + " | ".join(_gbnf_string(c) for c in _parse_choices(spec, limits))
    return spec  # ebnf as given; json_object: the engine's own


def _llguidance(kind: str, spec: str, preprocess: bool, limits: GrammarLimits) -> str:
    """llguidance's grammar text, validated: an invalid spec fails here, under the time budget."""
    if kind == "json_schema":
        grammar = llg.LLMatcher.grammar_from_json_schema(spec, overrides=_LLGUIDANCE_JSON_OPTIONS)
    elif kind == "json_object":
        grammar = llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=_LLGUIDANCE_JSON_OPTIONS)
    elif kind == "regex":
        grammar = llg.LLMatcher.grammar_from_regex(_regex_text(spec, preprocess))
    elif kind == "ebnf":
        grammar = llg.grammar_from("ebnf", spec)  # GBNF (`root ::= ...`) or Lark
    else:
        grammar = llg.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in _parse_choices(spec, limits)))
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"llguidance: invalid {kind}: {' '.join(' '.join(messages).split())[:400]}")
    return grammar


def _outlines(kind: str, spec: str, preprocess: bool, limits: GrammarLimits) -> str:
    """Everything as one regex (outlines-core compiles regular languages only)."""
    if kind == "json_schema":  # its date formats use \d: made ASCII too
        return _regex_text(outlines_json.build_regex_from_schema(spec), preprocess)
    if kind == "json_object":
        return _outlines_json_object()
    if kind == "regex":
        return _regex_text(spec, preprocess)
    if kind == "ebnf":
        raise GrammarError("outlines: EBNF grammars are not supported (outlines-core compiles regular "
                           "languages only); use the xgrammar or llguidance backend")
    return "|".join("".join("\\" + ch if ch in _REGEX_META else ch for ch in choice)
                    for choice in _parse_choices(spec, limits))


_ENGINES = {"llguidance": _llguidance, "outlines": _outlines}


@cache
def _outlines_json_object() -> str:
    """A JSON object whose values are scalars, or flat objects/arrays of scalars:
    {"k": 1, "o": {"x": 2}, "a": [1, "b"]}, but not {"o": {"p": {}}}.
    outlines' own regex for {"type": "object"} nests three deep and takes ~14 s to index."""
    ws, string = outlines_json.WHITESPACE, outlines_json.STRING

    def obj(value: str) -> str:
        member = rf"{string}{ws}:{ws}{value}"
        return rf"\{{{ws}({member}({ws},{ws}{member})*)?{ws}\}}"

    def arr(value: str) -> str:
        return rf"\[{ws}({value}({ws},{ws}{value})*)?{ws}\]"

    scalar = f"({string}|{outlines_json.NUMBER}|{outlines_json.BOOLEAN}|{outlines_json.NULL})"
    return obj(f"({scalar}|{obj(scalar)}|{arr(scalar)})")


def _gbnf_string(s: str) -> str:
    """A GBNF string literal: escape backslash, quote and control characters."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
