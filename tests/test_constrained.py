"""Every installed grammar backend, on the default model's tokenizer, checked by random walks.

A random walk samples uniformly among the tokens the matcher allows (radixrt/constrained/walk.py),
so it explores far stranger outputs than a model would. The invariant: every walk that ends
(the grammar accepted a stop token) spells an output that is valid for its spec.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from radixrt.constrained import (
    GrammarError,
    allocate_bitmask,
    apply_bitmask,
    bitmask_to_allowed,
    get_backend,
    tool_call_schema,
)
from radixrt.constrained.lenient import enforced
from radixrt.constrained.vocab import token_bytes
from radixrt.constrained.walk import Walker, json_validator

PACKAGES = {"xgrammar": "xgrammar", "llguidance": "llguidance", "outlines": "outlines_core"}
PAD = 64  # logits wider than the tokenizer, as in models with a padded vocabulary


@pytest.fixture(scope="module")
def tok():
    from radixrt.model.loader import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(None))


@pytest.fixture(scope="module")
def vocab_size(tok):
    return len(tok) + PAD


@pytest.fixture(scope="module")
def walker(tok, vocab_size):
    return Walker(token_bytes(tok, vocab_size), [tok.eos_token_id], vocab_size)


@pytest.fixture(scope="module", params=list(PACKAGES))
def backend(request, tok, vocab_size):
    if importlib.util.find_spec(PACKAGES[request.param]) is None:
        pytest.skip(f"{PACKAGES[request.param]} is not installed")
    return get_backend(request.param, tok, vocab_size)


def walks(backend, walker, kind, spec, n=3, seed=0, **kw):
    compiled = backend.compile(kind, spec)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = walker.walk(backend.matcher(compiled), rng, free_steps=(0, 8, 40)[i % 3], check_jump_forward=True, **kw)
        assert not w.error, w.error
        assert w.terminated, f"walk did not finish: {w.text!r}"
        out.append(w.text)
    return out


# ---- JSON schema -----------------------------------------------------------------------------
SCHEMAS = {
    "nested_objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "address": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                        "required": ["city"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["user"],
    },
    "array_bounds": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4}},
        "required": ["tags"],
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, "XL", None]}},
        "required": ["color", "size"],
    },
    "const": {
        "type": "object",
        "properties": {"version": {"const": "v1"}, "ok": {"const": True}},
        "required": ["version", "ok"],
    },
    "integer_bounds": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "count": {"type": "integer", "exclusiveMinimum": 5, "maximum": 1000},
        },
        "required": ["age", "count"],
    },
    "number_bounds": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": -1.5, "maximum": 2.5}},
        "required": ["score"],
    },
    "string_pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{2,4}$"}},
        "required": ["code"],
    },
    "string_length": {
        "type": "object",
        "properties": {"word": {"type": "string", "minLength": 2, "maxLength": 5}},
        "required": ["word"],
    },
    "refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/point"},
            "path": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 3},
        },
        "required": ["a", "path"],
    },
    "any_of": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^x+$"}, {"type": "null"}]}
        },
        "required": ["value"],
    },
    "tagged_one_of": {
        "type": "object",
        "properties": {
            "shape": {
                "oneOf": [
                    {
                        "type": "object",
                        "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
                        "required": ["kind", "r"],
                    },
                    {
                        "type": "object",
                        "properties": {"kind": {"const": "square"}, "side": {"type": "integer"}},
                        "required": ["kind"],
                    },
                ]
            }
        },
        "required": ["shape"],
    },
    "closed_object": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "note": {"type": "string"}},
        "required": ["id"],
        "additionalProperties": False,
    },
    "optional_properties": {
        "type": "object",
        "properties": {
            "a": {"type": "boolean"},
            "b": {"type": "number"},
            "c": {"type": "array", "items": {"type": "boolean"}},
        },
    },
    "top_level_array": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"type": "string"}},
            "required": ["k"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
}

# Known gaps: the backend refuses (GrammarError naming the keyword) rather than risk invalid output.
REFUSED = {("outlines", "integer_bounds"), ("outlines", "number_bounds"), ("xgrammar", "string_length")}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_walks_always_validate(backend, walker, name):
    spec = json.dumps(SCHEMAS[name])
    if (backend.name, name) in REFUSED:
        with pytest.raises(GrammarError):
            backend.compile("json_schema", spec)
        return
    check = json_validator(SCHEMAS[name])
    for text in walks(backend, walker, "json_schema", spec):
        assert check(text) is None, f"{backend.name} produced {text!r}: {check(text)}"


# Probes of single keywords and combinations that some engine gets wrong. The invariant holds
# whatever each backend decides: it refuses the schema (GrammarError), or every output is valid.
PROBES = {
    "not": {
        "type": "object",
        "properties": {"a": {"type": "integer", "not": {"enum": list(range(10))}}},
        "required": ["a"],
    },
    "uniqueItems": {"type": "array", "items": {"enum": [1, 2]}, "minItems": 2, "maxItems": 2, "uniqueItems": True},
    "contains": {"type": "array", "items": {"type": "integer"}, "contains": {"const": 7}, "maxItems": 3},
    "multipleOf": {"type": "integer", "multipleOf": 7},
    "int_range": {"type": "integer", "minimum": 10, "maximum": 20},
    "exclusive": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "minProperties": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}, "c": {"type": "integer"}},
        "minProperties": 2,
    },
    "propertyNames": {"type": "object", "propertyNames": {"pattern": "^[a-z]{2}$"}, "maxProperties": 3},
    "patternProperties": {
        "type": "object",
        "patternProperties": {"^x_[0-9]+$": {"type": "integer"}},
        "additionalProperties": False,
    },
    "dependentRequired": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "dependentRequired": {"a": ["b"]},
    },
    "if_then": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
        "if": {"required": ["a"]},
        "then": {"required": ["b"]},
    },
    "allOf": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "string"}}, "required": ["b"]},
        ]
    },
    "anyOf_sibling": {"type": "object", "properties": {"a": {"type": "string"}}, "anyOf": [{"required": ["a"]}]},
    "oneOf_overlap": {"oneOf": [{"type": "integer"}, {"type": "number"}]},
    "enum_type": {"type": "string", "enum": ["a", 1, None]},
    "length_pattern": {"type": "string", "pattern": "^[a-z]+$", "minLength": 3, "maxLength": 5},
    "length_format": {"type": "string", "format": "email", "maxLength": 12},
    "required_undeclared": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
    "ref_sibling": {
        "$defs": {"s": {"type": "string"}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/s", "maxLength": 3}},
        "required": ["a"],
    },
    "recursive_ref": {
        "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}},
        "$ref": "#/$defs/n",
    },
    **{
        f"format_{f}": {"type": "string", "format": f}
        for f in ["date", "date-time", "time", "email", "uri", "hostname", "ipv4", "uuid"]
    },
}


@pytest.mark.parametrize("name", list(PROBES))
def test_probe_is_refused_or_always_valid(backend, walker, name):
    try:
        compiled = backend.compile("json_schema", json.dumps(PROBES[name]))
    except GrammarError as exc:
        assert backend.name in str(exc)
        return
    check, rng = json_validator(PROBES[name]), random.Random(0)
    for i in range(8):
        w = walker.walk(backend.matcher(compiled), rng, free_steps=(0, 4, 16)[i % 3], max_tokens=300)
        assert not w.error, w.error
        if w.terminated:
            assert check(w.text) is None, f"{backend.name}: {w.text!r}: {check(w.text)}"


def test_json_object_is_a_json_object(backend, walker):
    for text in walks(backend, walker, "json_object", "", n=4):
        assert isinstance(json.loads(text), dict), text


def test_jump_forward_starts_with_the_forced_prefix(backend):
    spec = json.dumps(
        {
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"],
            "additionalProperties": False,
        }
    )
    forced = backend.matcher(backend.compile("json_schema", spec)).find_jump_forward()
    assert forced.startswith("{") and '{"name":'.startswith(forced.replace(" ", "")[:8])
    assert backend.matcher(backend.compile("choices", '["yes", "no"]')).find_jump_forward() == ""


# ---- regex and choices -----------------------------------------------------------------------
OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
REGEXES = {
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "ipv4": rf"({OCTET}\.){{3}}{OCTET}",
    "email": r"[a-zA-Z0-9._%+-]+@[a-zA-Z0-9-]+(\.[a-zA-Z0-9-]+)*\.[a-zA-Z]{2,6}",
    "identifier": r"[A-Za-z_][A-Za-z0-9_]{0,30}",
    "digits": r"\d{3}",  # Unicode digits pass too: \d means the same to Python's re
}


@pytest.mark.parametrize("name", list(REGEXES))
def test_regex_walks_fullmatch(backend, walker, name):
    for text in walks(backend, walker, "regex", REGEXES[name], n=4):
        assert re.fullmatch(REGEXES[name], text), f"{backend.name}: {text!r} !~ {REGEXES[name]}"


def test_choices_yield_exactly_one_choice(backend, walker):
    choices = ["yes", "no", "maybe so", 'ünï "quoted" \\ back', "no way"]
    seen = set(walks(backend, walker, "choices", json.dumps(choices), n=12))
    assert seen <= set(choices) and len(seen) >= 2


def test_ebnf(backend, walker):
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-z]+ | [0-9]'
    if backend.name == "outlines":
        with pytest.raises(GrammarError, match="EBNF"):
            backend.compile("ebnf", grammar)
        return
    for text in walks(backend, walker, "ebnf", grammar):
        assert re.fullmatch(r"\(([a-z]+|[0-9])(,([a-z]+|[0-9]))*\)", text), text


# ---- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,spec,needle",
    [
        ("json_schema", '{"type": "strin"}', "strin"),
        ("json_schema", "not json", "json"),
        ("json_schema", '{"type": "string", "pattern": "(("}', "json_schema"),
        ("json_schema", '{"type": "array", "uniqueItems": true}', "uniqueItems"),
        ("regex", "a(b", "regex"),
        ("choices", '["a", 1]', "choices"),
        ("sql", "select", "unknown grammar kind"),
    ],
)
def test_invalid_specs_raise_grammar_error(backend, kind, spec, needle):
    with pytest.raises(GrammarError) as info:
        backend.compile(kind, spec)
    assert needle.lower() in str(info.value).lower(), str(info.value)


def test_missing_package_names_the_pip_command(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    monkeypatch.delitem(sys.modules, "radixrt.constrained.llguidance_backend", raising=False)
    with pytest.raises(ImportError, match="pip install llguidance"):
        get_backend("llguidance", tok, len(tok))
    with pytest.raises(ValueError, match="unknown grammar backend"):
        get_backend("nope", tok, len(tok))


# ---- matcher state: accept, stop, rollback, copy ---------------------------------------------
def _encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


SIMPLE = json.dumps(
    {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"], "additionalProperties": False}
)


def _allowed(matcher, vocab_size):
    mask = allocate_bitmask(1, vocab_size)
    matcher.fill_bitmask(mask, 0)
    return bitmask_to_allowed(mask, vocab_size)[0]


def test_accept_rejects_without_changing_state(backend, tok, vocab_size):
    eos = tok.eos_token_id
    m = backend.matcher(backend.compile("json_schema", SIMPLE))
    before = _allowed(m, vocab_size)
    assert not before[eos] and not before[len(tok) :].any()  # no stop yet; padding ids never allowed
    assert not m.accept_token(_encode(tok, "x")[0]) and not m.accept_token(eos) and not m.accept_token(len(tok) + 1)
    assert torch.equal(_allowed(m, vocab_size), before)
    for t in _encode(tok, '{"name": "ab"}'):
        assert m.accept_token(t)
    assert _allowed(m, vocab_size).nonzero().flatten().tolist() == [eos]  # complete: only the stop token
    assert m.accept_token(eos) and m.is_terminated()
    assert not m.accept_token(_encode(tok, " ")[0])
    assert _allowed(m, vocab_size).nonzero().flatten().tolist() == [eos]


def test_rollback_restores_earlier_masks(backend, walker, tok, vocab_size):
    compiled = backend.compile("json_schema", json.dumps(SCHEMAS["array_bounds"]))
    m = backend.matcher(compiled)
    ids = _encode(tok, '{"tags": ["a", "bc"]}') + [tok.eos_token_id]
    masks = []
    for t in ids:
        masks.append(_allowed(m, vocab_size))
        assert m.accept_token(t)
    assert m.is_terminated()
    m.rollback(3)  # over the stop token and two more
    assert not m.is_terminated()
    assert torch.equal(_allowed(m, vocab_size), masks[-3])
    m.rollback(len(ids) - 3)
    assert torch.equal(_allowed(m, vocab_size), masks[0])
    for t in ids:
        assert m.accept_token(t)
    assert m.is_terminated()


def test_copy_continues_independently(backend, tok, vocab_size):
    m = backend.matcher(backend.compile("json_schema", SIMPLE))
    for t in _encode(tok, '{"name": "'):
        assert m.accept_token(t)
    fork = m.copy()
    for t in _encode(tok, 'left"}') + [tok.eos_token_id]:
        assert m.accept_token(t)
    assert m.is_terminated() and not fork.is_terminated()
    assert not _allowed(fork, vocab_size)[tok.eos_token_id]  # the fork is still inside the string
    for t in _encode(tok, 'right and more"}') + [tok.eos_token_id]:
        assert fork.accept_token(t)
    assert fork.is_terminated() and m.copy().is_terminated()


def test_fill_bitmask_writes_only_its_row(backend, tok, vocab_size):
    m = backend.matcher(backend.compile("regex", "[0-9]+"))
    mask = allocate_bitmask(3, vocab_size)
    m.fill_bitmask(mask, 1)
    assert (mask[0] == -1).all() and (mask[2] == -1).all()
    allowed = bitmask_to_allowed(mask, vocab_size)[1].nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]).isdigit() for t in allowed)


# ---- tool calls ------------------------------------------------------------------------------
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add_items",
            "parameters": {
                "type": "object",
                "$defs": {
                    "item": {
                        "type": "object",
                        "properties": {"sku": {"type": "string"}},
                        "required": ["sku"],
                        "additionalProperties": False,
                    }
                },
                "properties": {
                    "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 3}
                },
                "required": ["items"],
                "additionalProperties": False,
            },
        },
    },
]


def test_tool_call_grammar_walks_are_valid_calls(backend, walker):
    schema = tool_call_schema(TOOLS, "required")
    check = json_validator(schema)
    names = set()
    for text in walks(backend, walker, "json_schema", json.dumps(schema), n=6, seed=1):
        assert check(text) is None, f"{backend.name}: {text!r}: {check(text)}"
        names.add(json.loads(text)["name"])
    assert len(names) >= 2


# ---- a batch mixing constrained and unconstrained rows ---------------------------------------
def test_mixed_batch_constrained_rows_obey_and_free_rows_are_untouched(backend, tok, vocab_size):
    """The sampler's loop in miniature: rows 1 and 3 carry grammars, rows 0 and 2 do not."""
    specs = {1: ("json_schema", json.dumps(SCHEMAS["nested_objects"])), 3: ("regex", REGEXES["ipv4"])}
    matchers = {row: backend.matcher(backend.compile(*spec)) for row, spec in specs.items()}
    bitmask = allocate_bitmask(4, vocab_size)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        logits = torch.randn(4, vocab_size, generator=gen)
        free = logits[[0, 2]].argmax(-1)
        for row, m in matchers.items():
            m.fill_bitmask(bitmask, row)
        apply_bitmask(logits, bitmask, rows=sorted(matchers))
        tokens = logits.argmax(-1)
        assert torch.equal(tokens[[0, 2]], free)
        for row, m in matchers.items():
            if not m.is_terminated():
                assert m.accept_token(int(tokens[row])), f"row {row}: sampled a token its grammar rejects"


# ---- lenient schemas: tests/data/schemas/lenient (35 real-world shapes, each keyword) ------------
LENIENT = sorted((Path(__file__).parent / "data" / "schemas" / "lenient").glob("*.json"))


@pytest.mark.parametrize("path", LENIENT, ids=[p.stem for p in LENIENT])
def test_lenient_schema_compiles_what_strict_refuses(backend, walker, path):
    """Strict: refused, naming a keyword it would drop and where. Lenient: compiles, the list names
    exactly what was dropped (the expected list is written for llguidance), and every output is
    valid against the schema rebuilt from that list."""
    case = json.loads(path.read_text())
    schema, spec = case["schema"], json.dumps(case["schema"])
    try:
        compiled = backend.compile("json_schema_lenient", spec)
    except GrammarError as exc:  # xgrammar, outlines: structural keywords (allOf, ...) stay refused
        assert backend.name != "llguidance" and "does not enforce JSON schema keyword" in str(exc), str(exc)
        return
    if backend.name == "llguidance":
        assert sorted(compiled.unenforced) == sorted(case["unenforced"])
        if case["unenforced"]:
            with pytest.raises(GrammarError) as info:
                backend.compile("json_schema", spec)
            named = re.match(r"llguidance does not enforce JSON schema keyword '(\w+)' at (\S+?)[ ;]", str(info.value))
            assert named and f"{named[2].rstrip('/')}/{named[1]}" in case["unenforced"], str(info.value)
    check, rng = json_validator(enforced(schema, compiled.unenforced)), random.Random(0)
    for i in range(4):
        w = walker.walk(backend.matcher(compiled), rng, free_steps=(0, 4, 16, 48)[i], max_tokens=400)
        assert not w.error, w.error
        if w.terminated:
            assert check(w.text) is None, f"{backend.name}: {w.text!r}: {check(w.text)}"
