"""A JSON schema that admits exactly one call to one of the offered tools.

    {"name": "<tool name>", "arguments": {...valid against that tool's parameters...}}

With several tools the schema is an anyOf with one branch per tool; the branches are disjoint
(each pins "name" with const), so anyOf means the same as oneOf here.

A tool's parameters may use "$ref" into its own "$defs". Nested under "arguments", such refs
would point at the wrong root, so the parameters move to the root's "$defs" and every local
ref gets that prefix: "#/$defs/Item" -> "#/$defs/tool_0/$defs/Item", "#" -> "#/$defs/tool_0".
"""

from __future__ import annotations

import copy
from typing import Any


def tool_call_schema(tools: list[dict], tool_choice: Any = "required") -> dict:
    """Schema for one call. tool_choice: "required" | "auto" (any tool) or a tool name /
    {"type": "function", "function": {"name": ...}} (that tool only). "none" is an error:
    there is nothing to constrain."""
    specs = [_function(t) for t in tools]
    if not specs:
        raise ValueError("tool_call_schema: no tools given")
    names = [s["name"] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"tool_call_schema: duplicate tool names in {names}")
    wanted = _chosen_name(tool_choice)
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"tool_choice names {wanted!r}, which is not among the tools {names}")
        specs = [s for s in specs if s["name"] == wanted]
    defs: dict[str, Any] = {}
    branches = []
    for i, spec in enumerate(specs):
        params = spec.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        if _has_ref(params):
            defs[f"tool_{i}"] = _prefix_refs(copy.deepcopy(params), f"#/$defs/tool_{i}")
            params = {"$ref": f"#/$defs/tool_{i}"}
        branches.append({
            "type": "object",
            "properties": {"name": {"const": spec["name"]}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    if defs:
        schema = {**schema, "$defs": defs}
    return schema


def _function(tool: dict) -> dict:
    """Accept the OpenAI shape {"type": "function", "function": {...}} or the bare function."""
    fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"tool_call_schema: not a function tool: {tool!r}")
    return fn


def _chosen_name(tool_choice: Any) -> str | None:
    if tool_choice in (None, "auto", "required"):
        return None
    if tool_choice == "none":
        raise ValueError('tool_choice "none" allows no tool call; there is nothing to constrain')
    if isinstance(tool_choice, str):
        return tool_choice
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name", tool_choice.get("name"))
        if isinstance(name, str):
            return name
    raise ValueError(f"tool_choice must be 'auto', 'required', 'none' or name a function, "
                     f"not {tool_choice!r}")


def _has_ref(node: Any) -> bool:
    if isinstance(node, dict):
        return "$ref" in node or any(_has_ref(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_ref(v) for v in node)
    return False


def _prefix_refs(node: Any, root: str) -> Any:
    """Rewrite local refs ("#", "#/...") in place to live under `root`."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            node["$ref"] = root + ref[1:]
        for key, value in node.items():
            if key not in ("const", "enum", "default", "examples"):  # data, not schemas
                _prefix_refs(value, root)
    elif isinstance(node, list):
        for value in node:
            _prefix_refs(value, root)
    return node
