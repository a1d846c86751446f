"""Lenient JSON schemas: drop what the engine cannot enforce instead of refusing the schema.

OpenAI's `response_format.json_schema.strict: false` (or absent) asks for best effort. `relax`
removes each keyword the backend would refuse or ignore and names it by JSON pointer, so the
response can say what was not enforced; everything left is enforced exactly, and the output is
valid against the relaxed schema:

    oneOf the engine cannot enforce       -> anyOf (reported as .../oneOf: "exactly one" not checked)
    not, if/then/else, uniqueItems, contains, dependencies, dependentRequired/Schemas,
    propertyNames, unevaluated*, and what schema.UNSUPPORTED lists for xgrammar/outlines -> dropped
    a format JSON Schema defines but the engine lacks (uri-reference, iri, ...)           -> dropped
    a pattern the engine cannot compile (look-around, backreferences, \\b)               -> dropped
    llguidance: min/maxProperties it cannot build (optional properties, open objects)   -> dropped

Keywords that constrain nothing (`uniqueItems: false`, `then` without `if`, `minContains`
without `contains`) go silently. Formats JSON Schema does not define are annotations and
`normalize` drops them in strict mode too, unreported. Structural keywords (allOf, anyOf next
to other keywords, $ref with siblings, ...) are never dropped: `check` still refuses them.

Runs in the preparation process with the rest of prepare.py: one pass over a schema that
limits.check_schema already bounded, so linear in its size.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from .schema import NEVER_ENFORCED, STANDARD_FORMATS, UNSUPPORTED, normalize, subschemas

MAX_REPORTED = 100  # pointers in the report; more are summarized in one last entry
MAX_POINTER_CHARS = 256  # a longer pointer (absurdly long property names) is shortened

LLGUIDANCE_FORMATS = {"date-time", "date", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid"}
_LLGUIDANCE: dict[str, Callable[[dict], bool]] = {
    **{key: lambda node: True for key in (*NEVER_ENFORCED, "propertyNames")},
    "format": lambda node: isinstance(node["format"], str) and node["format"] in STANDARD_FORMATS - LLGUIDANCE_FORMATS,
}
# Dropping these would change what the schema is made of, not just relax one constraint.
_STRUCTURAL = {"allOf", "anyOf", "oneOf", "$ref", "required", "properties"}


def _table(backend: str) -> dict[str, Callable[[dict], bool]]:
    """keyword -> whether, at this node, `backend` would not enforce it."""
    if backend == "llguidance":
        return _LLGUIDANCE
    return {key: rule or (lambda node: True) for key, rule in UNSUPPORTED.get(backend, {}).items()
            if key not in _STRUCTURAL}


def _no_op(key: str, node: dict) -> bool:
    """A keyword that constrains nothing where it stands (JSON Schema ignores it)."""
    if key == "uniqueItems":
        return node[key] is False
    if key in ("then", "else"):
        return "if" not in node
    if key == "if":
        return "then" not in node and "else" not in node
    if key in ("minContains", "maxContains"):
        return "contains" not in node
    if key == "format":  # an annotation unless JSON Schema defines it; normalize drops it either way
        return isinstance(node[key], str) and node[key] not in STANDARD_FORMATS
    return False


def relax(schema: Any, backend: str, pattern_ok: Callable[[str], bool],
          accepts: Callable[[Any], bool] | None = None) -> tuple[Any, list[str]]:
    """(the relaxed, normalized schema, JSON pointers of the keywords dropped). `pattern_ok` says
    whether the engine compiles a pattern; `accepts` whether it compiles a whole schema (llguidance
    proves some oneOfs disjoint that oneof.py cannot: those stay oneOf)."""
    schema, dropped = copy.deepcopy(schema), []
    table = _table(backend)
    # subschemas() lists a node's children after the caller has seen the node, so a keyword
    # dropped here is not descended into (nothing inside a dropped `not` is reported).
    for path, node, _ in subschemas(schema):
        no_ops = {k for k in node if _no_op(k, node)}  # judged before anything is dropped
        for key in [k for k in node if k in table or k == "pattern" or k in no_ops]:
            if key in no_ops:
                del node[key]
            elif key == "pattern":
                if isinstance(node[key], str) and not pattern_ok(node[key]) or key in table and table[key](node):
                    del node[key]
                    dropped.append(f"{path}/pattern")
            elif table[key](node):
                del node[key]
                dropped.append(f"{path}/{key}")
    # normalize rewrites provably disjoint oneOfs as anyOf: pointers below are given in the
    # schema's own words (that anyOf is still the oneOf the caller wrote).
    renamed = {path for path, node, _ in subschemas(schema) if "oneOf" in node and "anyOf" not in node}
    schema = normalize(schema)
    nodes = [(_original(path, renamed), node) for path, node, _ in subschemas(schema)]
    if backend == "llguidance":  # decided on the normalized schema: it depends on closed objects
        for path, node in nodes:
            for key in ("minProperties", "maxProperties"):
                if key in node and not _llguidance_builds_bounds(node):
                    del node[key]
                    dropped.append(f"{path}/{key}")
    overlapping = [(path, node) for path, node in nodes if isinstance(node.get("oneOf"), list) and "anyOf" not in node]
    dropped += _one_of_as_any_of(schema, overlapping, accepts)
    return schema, dropped


MAX_ONE_OF_PROBES = 16  # schemas the engine is asked to compile to keep oneOfs it can enforce


def _one_of_as_any_of(schema: Any, overlapping: list[tuple[str, dict]],
                      accepts: Callable[[Any], bool] | None) -> list[str]:
    """Turn into anyOf each oneOf the engine cannot enforce ("exactly one" is then unchecked).
    Without `accepts`, or with more than MAX_ONE_OF_PROBES of them, all of them."""
    if not overlapping or accepts is not None and accepts(schema):
        return []
    for _, node in overlapping:
        node["anyOf"] = node.pop("oneOf")
    if accepts is None or len(overlapping) > MAX_ONE_OF_PROBES:
        return [f"{path}/oneOf" for path, _ in overlapping]
    dropped = []
    for path, node in overlapping:  # keep each one the engine still compiles with the others relaxed
        node["oneOf"] = node.pop("anyOf")
        if not accepts(schema):
            node["anyOf"] = node.pop("oneOf")
            dropped.append(f"{path}/oneOf")
    return dropped


def _original(path: str, renamed: set[str]) -> str:
    """`path` with the anyOfs normalize made of oneOfs spelled oneOf again."""
    out = ""
    for token in path.split("/")[1:]:
        out += "/" + ("oneOf" if token == "anyOf" and out in renamed else token)
    return out


def _llguidance_builds_bounds(node: dict) -> bool:
    """llguidance 1.9 builds min/maxProperties only when every listed property is required, or
    as "at least / at most one of the optional ones" of a closed object (its gen_json_object)."""
    props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    required = {r for r in node.get("required", []) if isinstance(r, str)} if isinstance(
        node.get("required"), list) else set()
    optional = len(set(props) - required)
    low = max(0, _count(node.get("minProperties")) - len(required))
    high = node.get("maxProperties")
    high = None if not isinstance(high, int) else max(0, high - len(required))
    if optional == 0 or (low == 0 and high is None):
        return True
    return low <= 1 and high in (None, 1) and not node.get("patternProperties") \
        and node.get("additionalProperties") is False


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def report(dropped: list[str]) -> tuple[str, ...]:
    """The pointers as the response shows them: bounded in number and length."""
    shown = [p if len(p) <= MAX_POINTER_CHARS else p[: MAX_POINTER_CHARS - 1] + "…" for p in dropped[:MAX_REPORTED]]
    if len(dropped) > MAX_REPORTED:
        shown.append(f"… and {len(dropped) - MAX_REPORTED:,} more")
    return tuple(shown)


# ---- patterns no regular-language engine compiles -------------------------------------------------
def regular_pattern(pattern: str) -> bool:
    """False for look-around, backreferences and word boundaries, which none of the engines (all
    automata over regular languages) can compile; the engine itself judges the rest."""
    i, in_class = 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if not in_class and (nxt in "123456789bBk"):
                return False
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            if pattern[i + 1 : i + 2] == "^":
                i += 1
            if pattern[i + 1 : i + 2] == "]":  # a ']' first in a class is a member
                i += 1
        elif ch == "(" and (pattern[i + 1 : i + 3] in ("?=", "?!") or pattern[i + 1 : i + 4] in ("?<=", "?<!")):
            return False
        i += 1
    return True


def enforced(schema: Any, unenforced: list[str] | tuple[str, ...]) -> Any:
    """The schema an output was held to, rebuilt from the original and the response's list: a copy
    without those keywords (a oneOf read as anyOf). What a client can validate against."""
    schema = copy.deepcopy(schema)
    for pointer in unenforced:
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]
        node = schema
        for token in tokens[:-1]:
            node = node[int(token)] if isinstance(node, list) else node[token]
        if tokens[-1] == "oneOf":
            node["anyOf"] = node.pop("oneOf")
        else:
            del node[tokens[-1]]
    return schema
