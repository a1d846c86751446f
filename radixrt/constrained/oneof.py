"""When a oneOf means the same as an anyOf: when no value can match two of its branches.

Every engine can build an anyOf; none can check "exactly one". normalize (schema.py) rewrites a
oneOf whose branches provably exclude each other, pair by pair, by these rules:
  (1) their types do not meet;
  (2) both list their values (const/enum) and share none;
  (3) both are objects that pin a common required property to different values (a tagged union).
Comparing every pair was quadratic (a oneOf of 3,000 consts took 17-26 s), so branches are
grouped by type and values are counted, not compared: linear in the branches (object branches
without a common tag fall back to pairs, bounded by GrammarLimits.max_alternatives).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_OBJECT = frozenset({"object"})


@dataclass
class _Branch:
    types: frozenset[str] | None
    values: set[str] | None  # const/enum, as canonical JSON
    tags: dict[str, set[str]]  # objects: required property -> the values it is pinned to


def pairwise_disjoint(branches: list, outer: set[str] | None) -> bool:
    """True if no value can match two branches (rules above)."""
    if not all(isinstance(b, dict) for b in branches):
        return False
    groups: dict[frozenset[str] | None, list[_Branch]] = {}
    for node in branches:
        branch = _branch(node, outer)
        groups.setdefault(branch.types, []).append(branch)
    keys = list(groups)
    for i, a in enumerate(keys):
        for b in keys[i:]:
            if a is not None and b is not None and not a & b:
                continue  # rule (1) separates every pair across these two groups
            if a == b == _OBJECT:
                apart = _objects_apart(groups[a])
            elif a == b:
                apart = _values_apart(groups[a])
            else:
                apart = _values_apart_across(groups[a], groups[b])
            if not apart:
                return False
    return True


def _branch(node: dict, outer: set[str] | None) -> _Branch:
    types = _meet(declared_types(node), outer)
    return _Branch(None if types is None else frozenset(types), _values(node),
                   _tags(node) if types == _OBJECT else {})


def _tags(node: dict) -> dict[str, set[str]]:
    props, required = node.get("properties", {}), node.get("required", [])
    if not isinstance(props, dict) or not isinstance(required, list):
        return {}
    pinned = {name: _values(props[name]) for name in required
              if isinstance(name, str) and isinstance(props.get(name), dict)}
    return {name: values for name, values in pinned.items() if values is not None}


def _values_apart(group: list[_Branch]) -> bool:
    """Rule (2) for every pair within one group."""
    if len(group) < 2:
        return True
    return all(b.values is not None for b in group) and _all_distinct([b.values for b in group])


def _values_apart_across(group: list[_Branch], other: list[_Branch]) -> bool:
    """Rule (2) for every pair with one branch in each group."""
    if any(b.values is None for b in group + other):
        return False
    return not set().union(*(b.values for b in group)) & set().union(*(b.values for b in other))


def _objects_apart(group: list[_Branch]) -> bool:
    """Rule (2) or (3) for every pair of object branches. A pair that rule (3) does not separate
    shares a value on every common tag, so only pairs sharing a value on the most selective
    common tag are compared one by one (none in a tagged union)."""
    if len(group) < 2:
        return True
    if all(b.values is not None for b in group) and _all_distinct([b.values for b in group]):
        return True
    common = set.intersection(*(set(b.tags) for b in group))
    if not common:
        candidates = [(a, b) for i, a in enumerate(group) for b in group[i + 1:]]
    else:
        buckets = min((_buckets(group, name) for name in common), key=lambda bs: sum(len(b) ** 2 for b in bs))
        candidates = [(a, b) for bucket in buckets for i, a in enumerate(bucket) for b in bucket[i + 1:]]
    return all(_apart(a, b) for a, b in candidates)


def _buckets(group: list[_Branch], tag: str) -> list[list[_Branch]]:
    """The branches sharing each value of `tag`, for the values more than one branch has."""
    by_value: dict[str, list[_Branch]] = {}
    for branch in group:
        for value in branch.tags[tag]:
            by_value.setdefault(value, []).append(branch)
    return [bucket for bucket in by_value.values() if len(bucket) > 1]


def _apart(a: _Branch, b: _Branch) -> bool:
    """Rule (2) or (3) for one pair of object branches."""
    if a.values is not None and b.values is not None and not a.values & b.values:
        return True
    return any(not a.tags[name] & b.tags[name] for name in a.tags.keys() & b.tags.keys())


def _all_distinct(sets: list[set[str]]) -> bool:
    """No element in two of the sets."""
    return sum(map(len, sets)) == len(set().union(*sets))


def declared_types(node: dict) -> set[str] | None:
    """The JSON types a schema admits, from type/const/enum; None if it does not say."""
    t = node.get("type")
    if isinstance(t, str):
        types = {t}
    elif isinstance(t, list) and all(isinstance(x, str) for x in t):
        types = set(t)
    elif "const" in node:
        return type_of(node["const"])
    elif isinstance(node.get("enum"), list):
        return set().union(*(type_of(v) for v in node["enum"])) if node["enum"] else set()
    else:
        return None
    return types | {"integer"} if "number" in types else types


def _meet(a: set[str] | None, b: set[str] | None) -> set[str] | None:
    return b if a is None else a if b is None else a & b


def type_of(value: Any) -> set[str]:
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return {"integer", "number"}
    return {float: {"number"}, str: {"string"}, list: {"array"}, dict: {"object"},
            type(None): {"null"}}[type(value)]


def _values(node: dict) -> set[str] | None:
    if "const" in node:
        return {json.dumps(node["const"], sort_keys=True)}
    if isinstance(node.get("enum"), list):
        return {json.dumps(v, sort_keys=True) for v in node["enum"]}
    return None


