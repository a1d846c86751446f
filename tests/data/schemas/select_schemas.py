"""Pick the engine test's JSON-schema corpus from JSONSchemaBench and copy it here.

    python tests/data/schemas/select_schemas.py [/work/shared/data/jsonschemabench]

Deterministic: candidates are the Glaiveai2K and Github_trivial schemas that the default
grammar backend (llguidance) compiles and whose compact text is at most MAX_CHARS; for each
feature in FEATURES, in that order, the first QUOTA candidates not yet picked that have it
(the two folders interleaved, each in filename order; Glaiveai2K holds many variants of one
function, e.g. calculate_area_<hash>, so only the first of each name is a candidate); then the remaining candidates,
interleaved the same way, up to TOTAL. The files are copied unchanged to
jsonschemabench/<subset>/<name> next to this script. tests/test_constrained_engine.py imports
`features()` from here and asserts that the copied corpus covers every feature.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = Path("/work/shared/data/jsonschemabench")
SUBSETS = ("Glaiveai2K", "Github_trivial")
FEATURES = (
    "nested_object", "array_bounds", "enum", "const", "number_bounds", "string_pattern", "string_format",
    "optional_and_required", "ref_defs", "anyOf", "oneOf", "additionalProperties",
)
QUOTA = 16
TOTAL = 216
MAX_CHARS = 1500

_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "additionalItems")


def _nodes(schema, depth=0):
    """Every schema node (not property-name maps) with its nesting depth in objects/arrays."""
    if not isinstance(schema, dict):
        return
    yield schema, depth
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for sub in schema[key].values():
                yield from _nodes(sub, depth + (key in ("properties", "patternProperties")))
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for sub in schema[key]:
                yield from _nodes(sub, depth)
    for key in _SUBSCHEMA:
        sub = schema.get(key)
        if isinstance(sub, dict):
            yield from _nodes(sub, depth + (key in ("items", "additionalProperties")))
        elif key == "items" and isinstance(sub, list):
            for s in sub:
                yield from _nodes(s, depth + 1)


def features(schema: dict) -> set[str]:
    """Which of FEATURES a schema uses (keywords found on schema nodes, not in property names)."""
    found = set()
    for node, depth in _nodes(schema):
        if depth >= 1 and (node.get("type") == "object" or isinstance(node.get("properties"), dict)):
            found.add("nested_object")
        if "minItems" in node or "maxItems" in node:
            found.add("array_bounds")
        for key in ("enum", "const", "anyOf", "oneOf", "additionalProperties"):
            if key in node:
                found.add(key)
        if any(k in node for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            found.add("number_bounds")
        if isinstance(node.get("pattern"), str):
            found.add("string_pattern")
        if isinstance(node.get("format"), str):
            found.add("string_format")
        props, required = node.get("properties"), node.get("required")
        if isinstance(props, dict) and isinstance(required, list) and required and set(props) - set(required):
            found.add("optional_and_required")
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
            found.add("ref_defs")
    return found


def _interleave(lists):
    for group in itertools.zip_longest(*lists):
        yield from (x for x in group if x is not None)


def select(source: Path = SOURCE) -> list[tuple[str, set[str]]]:
    from radixrt.constrained import GrammarError, get_backend
    from radixrt.model.loader import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(None))
    backend = get_backend("llguidance", tok, len(tok))
    per_subset = []
    for subset in SUBSETS:
        ok, families = [], set()
        for path in sorted((source / subset).glob("*.json")):
            family = re.sub(r"_[0-9a-f]{8}$", "", path.stem)  # Glaive: one schema per function name
            if family in families:
                continue
            text = path.read_text()
            schema = json.loads(text)
            if len(json.dumps(schema, separators=(",", ":"))) > MAX_CHARS:
                continue
            try:
                backend.compile("json_schema", text)
            except GrammarError:
                continue
            families.add(family)
            ok.append((f"{subset}/{path.name}", features(schema)))
        per_subset.append(ok)
    candidates = list(_interleave(per_subset))
    picked: dict[str, set[str]] = {}
    for feature in FEATURES:
        have = [name for name, f in candidates if feature in f and name not in picked]
        for name in have[:QUOTA]:
            picked[name] = dict(candidates)[name]
    for name, f in candidates:
        if len(picked) >= TOTAL:
            break
        picked.setdefault(name, f)
    return list(picked.items())


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE
    chosen = select(source)
    out = HERE / "jsonschemabench"
    shutil.rmtree(out, ignore_errors=True)
    for name, _ in chosen:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, out / name)
    counts = {f: sum(f in fs for _, fs in chosen) for f in FEATURES}
    print(f"{len(chosen)} schemas -> {out}")
    print(json.dumps(counts))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[2]))
    main()
