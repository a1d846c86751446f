"""What one grammar spec may cost: a size budget checked before any work, a time budget for
compiling (enforced by compiler.py, which kills the preparation process that overruns it).

The defaults leave wide headroom over real schemas: the 2,151 JSONSchemaBench schemas are at
most 75,800 characters, 354 objects, 22 levels deep, 463 alternatives in one list, 228
characters of pattern. A spec over a limit fails at once with GrammarTooLarge naming the
request field, the limit and where in the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import GrammarTooLarge

# Keywords whose list is a choice among alternatives (each one a branch the engine must build).
_ALTERNATIVES = ("anyOf", "oneOf", "allOf", "enum", "prefixItems")


@dataclass(frozen=True)
class GrammarLimits:
    time_budget_s: float = 10.0  # preparation + engine compile, from when the work starts
    max_spec_chars: int = 262_144  # the spec text
    max_regex_chars: int = 16_384  # a regex spec, a schema `pattern` or `patternProperties` key
    max_schema_objects: int = 10_000  # JSON objects in a schema document
    max_depth: int = 64  # nesting of a schema document
    max_alternatives: int = 4_096  # items of one anyOf/oneOf/allOf/enum/prefixItems; choices
    memory_mb: int = 1_024  # address space of each preparation process


def check_spec(kind: str, spec: str, limits: GrammarLimits) -> None:
    """The size checks that need no parsing: O(1), so the caller can refuse before queueing."""
    if len(spec) > limits.max_spec_chars:
        raise GrammarTooLarge(f"{kind}: {len(spec):,} characters exceed the limit of {limits.max_spec_chars:,} "
                              "(max_spec_chars)")
    if kind == "regex" and len(spec) > limits.max_regex_chars:
        raise GrammarTooLarge(f"regex: {len(spec):,} characters exceed the limit of {limits.max_regex_chars:,} "
                              "(max_regex_chars)")


def check_schema(schema: Any, limits: GrammarLimits) -> None:
    """One pass over a parsed schema document: object count, depth, list lengths, patterns."""
    objects = 0
    stack: list[tuple[Any, int, str]] = [(schema, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > limits.max_depth:
            raise GrammarTooLarge(f"json_schema: nested deeper than the limit of {limits.max_depth} "
                                  f"(max_depth) at {path}")
        if isinstance(node, list):
            stack.extend((v, depth + 1, f"{path}/{i}") for i, v in enumerate(node) if isinstance(v, (dict, list)))
            continue
        objects += 1
        if objects > limits.max_schema_objects:
            raise GrammarTooLarge(f"json_schema: more than {limits.max_schema_objects:,} objects "
                                  "(max_schema_objects)")
        for key, value in node.items():
            where = f"{path}/{key}"
            if key in _ALTERNATIVES and isinstance(value, list) and len(value) > limits.max_alternatives:
                raise GrammarTooLarge(f"json_schema: {len(value):,} alternatives at {where} exceed the limit of "
                                      f"{limits.max_alternatives:,} (max_alternatives)")
            if key == "pattern" and isinstance(value, str):
                _check_regex(value, where, limits)
            if key == "patternProperties" and isinstance(value, dict):
                for pattern in value:
                    _check_regex(pattern, where, limits)
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1, where))


def check_choices(choices: list, limits: GrammarLimits) -> None:
    if len(choices) > limits.max_alternatives:
        raise GrammarTooLarge(f"choices: {len(choices):,} choices exceed the limit of {limits.max_alternatives:,} "
                              "(max_alternatives)")


def _check_regex(pattern: str, where: str, limits: GrammarLimits) -> None:
    if len(pattern) > limits.max_regex_chars:
        raise GrammarTooLarge(f"json_schema: a pattern of {len(pattern):,} characters at {where} exceeds the limit "
                              f"of {limits.max_regex_chars:,} (max_regex_chars)")
