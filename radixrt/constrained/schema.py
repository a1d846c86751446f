"""JSON schemas on their way to an engine: normalize, then refuse what the engine would ignore.

`normalize` rewrites a schema into an equivalent or narrower one that every engine reads alike:
  - `oneOf` whose branches provably exclude each other (oneof.py) becomes `anyOf` (same meaning; every
    engine can do anyOf, none can check "exactly one");
  - `enum`/`const` next to `type` keep only the values of that type (xgrammar ignores the type);
  - an object with `properties` and no word on extra keys gets `additionalProperties: false`,
    as in OpenAI's strict mode and xgrammar's default: outputs carry the declared keys only
    (free extra keys also let an engine repeat a key, which no engine prevents);
  - a `format` JSON Schema does not define is an annotation and is dropped;
  - `\\d`, `\\w`, `\\s` in patterns become ASCII, as in JSON Schema's ECMA-262 regexes (regex.py).

`check` then refuses keywords an engine would silently ignore, naming the keyword and where it
is. The tables come from bench/grammar_coverage.py --raw and tests/test_constrained.py's probes:
each entry produced invalid outputs there. llguidance refuses what it lacks by itself.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Iterator

from .errors import GrammarError
from .oneof import declared_types, pairwise_disjoint, type_of
from .regex import ascii_classes

STANDARD_FORMATS = {
    "date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname", "ipv4", "ipv6",
    "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template", "json-pointer",
    "relative-json-pointer", "regex",
}
_COMBINATORS = ("anyOf", "oneOf", "allOf")
_OPEN_WORLD = ("allOf", "not", "if", "dependentSchemas", "dependencies", "unevaluatedProperties")
_ANNOTATIONS = {"title", "description", "default", "examples", "example", "$comment", "$schema", "$id", "id",
                "deprecated", "readOnly", "writeOnly", "$defs", "definitions"}


def normalize(schema: Any) -> Any:
    """An equivalent or narrower copy of `schema` (see the module docstring). Linear in its size."""
    schema = copy.deepcopy(schema)
    nodes = list(subschemas(schema))
    for _, node, _ in nodes:
        _normalize_node(node)
    # Closing objects narrows only where a schema is used positively and alone; composition
    # (allOf, not, if, dependent schemas) could add keys or flip the meaning: leave those be.
    if not any(k in node for _, node, _ in nodes for k in _OPEN_WORLD):
        branches = {(id(node), id(b)) for _, node, _ in nodes for k in ("anyOf", "oneOf")
                    if isinstance(node.get(k), list) for b in node[k]}
        for _, node, parent in nodes:
            _close_object(node, parent if (id(parent), id(node)) in branches else None)
    return schema


def _normalize_node(node: dict) -> None:
    if isinstance(node.get("pattern"), str):
        node["pattern"] = ascii_classes(node["pattern"])
    if isinstance(node.get("patternProperties"), dict):
        node["patternProperties"] = {ascii_classes(k): v for k, v in node["patternProperties"].items()}
    if isinstance(node.get("format"), str) and node["format"] not in STANDARD_FORMATS:
        del node["format"]
    types = declared_types(node)
    if types is not None and isinstance(node.get("enum"), list):
        node["enum"] = [v for v in node["enum"] if type_of(v) & types]
        if not node["enum"]:
            raise GrammarError("no value satisfies this schema: no 'enum' value has the declared 'type'")
    if types is not None and "const" in node and not type_of(node["const"]) & types:
        raise GrammarError("no value satisfies this schema: 'const' does not have the declared 'type'")
    branches = node.get("oneOf")
    if isinstance(branches, list) and pairwise_disjoint(branches, types) and "anyOf" not in node:
        node["anyOf"] = node.pop("oneOf")


def _close_object(node: dict, union: dict | None) -> None:
    """additionalProperties: false for an object that lists its properties and says nothing
    else about extra keys (nor does `union`, the schema whose anyOf/oneOf branch it is)."""
    props = node.get("properties")
    if not isinstance(props, dict) or not props or not set(node.get("required", [])) <= set(props):
        return
    if any(k in node for k in ("additionalProperties", "patternProperties", "$ref", "anyOf", "oneOf")):
        return
    if union is not None and \
            any(k in union for k in ("properties", "required", "patternProperties", "additionalProperties")):
        return
    node["additionalProperties"] = False


# ---- what each engine would ignore ----------------------------------------------------------
Rule = Callable[[dict], bool] | None  # None: never enforced; else True where not enforced


def _with_siblings(node: dict) -> bool:
    return any(k not in _ANNOTATIONS and k not in _COMBINATORS for k in node)


def _length_with_pattern(node: dict) -> bool:
    return "pattern" in node or "format" in node


def _undeclared_required(node: dict) -> bool:
    props = node.get("properties")
    return isinstance(props, dict) and not set(node.get("required", [])) <= set(props)


def _ref_with_siblings(node: dict) -> bool:
    return any(k not in _ANNOTATIONS and k != "$ref" for k in node)


def _object_keywords_on_other_type(node: dict) -> bool:
    types = declared_types(node)
    return types is not None and "object" not in types


def _outlines_properties(node: dict) -> bool:
    """outlines: properties on a non-object type; or a property that takes any value, whose regex
    alternatives outlines leaves ungrouped ({"v": {}} let `[3]` or `[null]` through as the object)."""
    props = node.get("properties")
    any_value = isinstance(props, dict) and any(v is True or isinstance(v, dict) and not set(v) - _ANNOTATIONS
                                                for v in props.values())
    return any_value or _object_keywords_on_other_type(node)


_RISKY_ESCAPES = ("s", "S", "W", "D", "p", "P", "t", "n", "r", "f", "v", "x", "u", "\\")


def _pattern_may_break_json(node: dict) -> bool:
    """outlines pastes a pattern into its JSON-string regex unescaped: a pattern that can match
    a quote, a backslash or a control character can produce broken JSON."""
    p = node.get("pattern")
    if not isinstance(p, str):
        return False
    escapes = re.findall(r"\\(.)", p)
    bare = re.sub(r"\\.", "", p)
    return "." in bare or "[^" in p or '"' in p or any(e in _RISKY_ESCAPES for e in escapes)


def _format_in(*names: str) -> Rule:
    return lambda node: node.get("format") in names


NEVER_ENFORCED = ("not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
                  "dependencies", "dependentRequired", "dependentSchemas", "unevaluatedProperties",
                  "unevaluatedItems")  # by no engine

_COMMON = {**dict.fromkeys(NEVER_ENFORCED), "allOf": None, "oneOf": None,  # a oneOf left by normalize overlaps
           "anyOf": _with_siblings, "required": _undeclared_required, "$ref": _ref_with_siblings}

UNSUPPORTED: dict[str, dict[str, Rule]] = {
    "xgrammar": {
        **_COMMON,
        "minLength": None, "maxLength": None,  # bounded strings admit raw control characters
        "multipleOf": None,
        # date: any day 01-31; hostname: long labels; ipv4: 077; idn-*, iri*, regex: any string at all
        "format": _format_in("date", "date-time", "hostname", "ipv4", "idn-email", "idn-hostname", "iri",
                             "iri-reference", "regex"),
    },
    "llguidance": {},
    "outlines": {
        **_COMMON,
        **dict.fromkeys(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                         "minProperties", "maxProperties", "propertyNames", "patternProperties")),
        "properties": _outlines_properties,  # {"type": "array", "properties": {}} -> {}; {"v": {}} anything
        "pattern": _pattern_may_break_json,
        "minLength": _length_with_pattern, "maxLength": _length_with_pattern,
        # date: any day 01-31; date-time, time: no offset, bad escapes; email, uri: unescaped quotes
        "format": lambda node: node.get("format") != "uuid",
    },
}


def check(schema: Any, backend: str) -> None:
    """Raise GrammarError naming the first keyword `backend` would not enforce, and where."""
    table = UNSUPPORTED.get(backend, {})
    for path, node, _ in subschemas(schema):
        for key, rule in table.items():
            if key in node and (rule is None or rule(node)):
                what = f"{key} {node[key]!r}" if key == "format" else repr(key)
                raise GrammarError(f"{backend} does not enforce JSON schema keyword {what} (at {path or '/'}"
                                   f"{'' if rule is None else ', in this combination'}); "
                                   "use another grammar backend or drop the keyword")


# ---- traversal ------------------------------------------------------------------------------
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("additionalProperties", "additionalItems", "unevaluatedProperties", "unevaluatedItems",
               "contains", "propertyNames", "not", "if", "then", "else")


def subschemas(node: Any, path: str = "",
               parent: dict | None = None) -> Iterator[tuple[str, dict, dict | None]]:
    """Every schema object inside `node` (depth first): its JSON pointer, itself, its parent.
    An explicit stack, not recursion: nested generators cost O(depth) per schema yielded."""
    stack = [(path, node, parent)]
    while stack:
        path, node, parent = stack.pop()
        if isinstance(node, dict):
            yield path, node, parent
            stack.extend(reversed([(p, child, node) for p, child in _children(path, node)]))


def _children(path: str, node: dict) -> Iterator[tuple[str, Any]]:
    """The values of `node` that are schemas, with their JSON pointers."""
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                yield f"{path}/{key}/{_token(name)}", sub
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                yield f"{path}/{key}/{i}", sub
    for key in _SCHEMA_ONE:
        yield f"{path}/{key}", node.get(key)
    items = node.get("items")
    if isinstance(items, list):  # draft 4-7 tuple form
        for i, sub in enumerate(items):
            yield f"{path}/items/{i}", sub
    else:
        yield f"{path}/items", items
    if isinstance(node.get("dependencies"), dict):
        for name, sub in node["dependencies"].items():
            yield f"{path}/dependencies/{_token(name)}", sub


def _token(name: str) -> str:
    """A property name as one JSON-pointer token (RFC 6901)."""
    return name.replace("~", "~0").replace("/", "~1")
