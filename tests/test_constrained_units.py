"""Engine-free parts of radixrt.constrained: bitmasks, the compile cache, tool schemas, the
keyword audit. These need no grammar package and no tokenizer."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixrt.constrained import (
    CompiledGrammar,
    GrammarBackend,
    GrammarCompiler,
    GrammarError,
    allocate_bitmask,
    apply_bitmask,
    bitmask_to_allowed,
    tool_call_schema,
)
from radixrt.constrained.schema import UNSUPPORTED, check, normalize


# ---- bitmask -------------------------------------------------------------------------------
def _mask_allowing(batch: int, vocab: int, allowed: dict[int, list[int]]) -> torch.Tensor:
    mask = allocate_bitmask(batch, vocab)
    for row, tokens in allowed.items():
        mask[row] = 0
        for t in tokens:
            mask[row, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)
    return mask


def test_bitmask_layout_bit_31_is_the_sign_bit():
    """Token 32w+31 is bit 31 of word w; allocate_bitmask starts with every token allowed."""
    vocab = 100
    assert allocate_bitmask(3, vocab).shape == (3, 4)
    assert bitmask_to_allowed(allocate_bitmask(2, vocab), vocab).all()
    mask = _mask_allowing(1, vocab, {0: [0, 31, 63, 99]})
    assert bitmask_to_allowed(mask, vocab)[0].nonzero().flatten().tolist() == [0, 31, 63, 99]


def test_apply_bitmask_touches_only_the_constrained_rows():
    """Invariant: a request without a grammar is never touched by another's mask."""
    vocab = 77
    logits = torch.randn(4, vocab)
    before = logits.clone()
    mask = _mask_allowing(4, vocab, {1: [3, 31, 76], 3: [0]})
    mask[0] = 0  # garbage in an unconstrained row must not matter
    apply_bitmask(logits, mask, rows=[1, 3])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [3, 31, 76]
    assert torch.equal(logits[1, [3, 31, 76]], before[1, [3, 31, 76]])
    assert torch.isfinite(logits[3]).nonzero().flatten().tolist() == [0]


def test_apply_bitmask_no_rows_and_wider_logits():
    vocab = 64
    logits = torch.zeros(2, vocab + 5)  # logits wider than the mask: the extra ids are never allowed
    apply_bitmask(logits, _mask_allowing(2, vocab, {0: [1], 1: [63]}), rows=[])
    assert torch.isfinite(logits).all()
    apply_bitmask(logits, _mask_allowing(2, vocab, {0: [1], 1: [63]}))
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [1]
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [63]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 200), st.data())
def test_apply_bitmask_matches_a_per_token_loop(batch, vocab, data):
    """Property: the vectorized apply equals the obvious per-token definition."""
    words = (vocab + 31) // 32
    mask = torch.tensor(
        data.draw(
            st.lists(
                st.lists(st.integers(-(2**31), 2**31 - 1), min_size=words, max_size=words),
                min_size=batch,
                max_size=batch,
            )
        ),
        dtype=torch.int32,
    )
    rows = sorted(data.draw(st.sets(st.integers(0, batch - 1))))
    logits = torch.randn(batch, vocab, dtype=torch.bfloat16)
    expected = logits.clone()
    for r in rows:
        for t in range(vocab):
            if not (int(mask[r, t // 32]) >> (t % 32)) & 1:
                expected[r, t] = float("-inf")
    apply_bitmask(logits, mask, rows)
    assert torch.equal(logits, expected)


# ---- compiler ------------------------------------------------------------------------------
class SlowBackend(GrammarBackend):
    """Compiles anything but 'bad' after a delay; counts compilations."""

    name = "slow"

    def __init__(self, delay: float = 0.2) -> None:
        self.delay, self.calls = delay, 0
        self.release = threading.Event()

    def _compile(self, kind, spec):
        self.calls += 1
        self.release.wait(5)
        time.sleep(self.delay)
        if spec == "bad":
            raise GrammarError("slow: invalid regex: bad")
        return spec.upper()

    def matcher(self, compiled):
        raise NotImplementedError


def test_compiler_never_blocks_and_caches_results_and_failures():
    backend = SlowBackend()
    compiler = GrammarCompiler(backend, max_workers=2, cache_size=8)
    start = time.perf_counter()
    future = compiler.submit("regex", "a+")
    again = compiler.submit("regex", "a+")
    assert time.perf_counter() - start < 0.05 and not future.done()  # the step loop is never blocked
    assert again is not future and not again.done()  # each caller's own future (cancel() is per caller)
    backend.release.set()
    compiled = future.result(5)
    assert isinstance(compiled, CompiledGrammar) and compiled.handle == "A+"
    assert again.result(5) is compiled  # one compilation, shared
    bad = compiler.submit("regex", "bad")
    with pytest.raises(GrammarError, match="bad"):
        bad.result(5)
    start = time.perf_counter()
    bad_again = compiler.submit("regex", "bad")  # a cached failure is rejected at once
    assert bad_again.done() and time.perf_counter() - start < 0.05
    assert isinstance(bad_again.exception(), GrammarError)
    assert backend.calls == 2
    assert (compiler.stats.hits, compiler.stats.misses, compiler.stats.failures) == (2, 2, 1)
    compiler.shutdown()


def test_compiler_lru_evicts_oldest_and_rejects_unknown_kinds():
    backend = SlowBackend(delay=0)
    backend.release.set()
    compiler = GrammarCompiler(backend, cache_size=2)
    for spec in ("a", "b", "a", "c"):  # "a" was used last before "c": "b" goes
        compiler.submit("regex", spec).result(5)
    assert len(compiler) == 2 and backend.calls == 3
    compiler.submit("regex", "a").result(5)
    assert backend.calls == 3
    compiler.submit("regex", "b").result(5)
    assert backend.calls == 4
    with pytest.raises(GrammarError, match="unknown grammar kind"):
        compiler.submit("yaml", "x").result(5)
    compiler.shutdown()


# ---- tool calls ----------------------------------------------------------------------------
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
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
                        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                        "required": ["sku", "qty"],
                    }
                },
                "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1}},
                "required": ["items"],
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},
]


def test_tool_call_schema_accepts_a_correct_call_and_rejects_a_wrong_tool():
    jsonschema = pytest.importorskip("jsonschema")
    schema = tool_call_schema(TOOLS, "required")
    ok = [
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}},
        {"name": "add_items", "arguments": {"items": [{"sku": "x1", "qty": 2}]}},
        {"name": "ping", "arguments": {}},
    ]
    bad = [
        {"name": "get_wether", "arguments": {"city": "Paris"}},  # no such tool
        {"name": "get_weather", "arguments": {"town": "Paris"}},  # wrong arguments
        {"name": "add_items", "arguments": {"items": [{"sku": "x1", "qty": 0}]}},  # $ref'd bound
        {"name": "ping", "arguments": {}, "extra": 1},
    ]
    validator = jsonschema.Draft202012Validator(schema)
    assert all(validator.is_valid(call) for call in ok)
    assert not any(validator.is_valid(call) for call in bad)
    named = jsonschema.Draft202012Validator(tool_call_schema(TOOLS, {"type": "function", "function": {"name": "ping"}}))
    assert named.is_valid(ok[2]) and not named.is_valid(ok[0])


def test_tool_call_schema_errors():
    with pytest.raises(ValueError, match="not among the tools"):
        tool_call_schema(TOOLS, "nope")
    with pytest.raises(ValueError, match="none"):
        tool_call_schema(TOOLS, "none")
    with pytest.raises(ValueError, match="no tools"):
        tool_call_schema([], "required")


# ---- JSON schema preprocessing ---------------------------------------------------------------
def test_check_names_the_keyword_and_where_it_is():
    for backend, table in UNSUPPORTED.items():
        for keyword, rule in table.items():
            if rule is None:
                schema = {"type": "object", "properties": {"a": {"anyOf": [{"type": "array", keyword: True}]}}}
                with pytest.raises(GrammarError, match=f"{keyword}.*at /properties/a/anyOf/0"):
                    check(schema, backend)
    check({"type": "object", "properties": {"uniqueItems": {"type": "string"}}}, "xgrammar")  # a name, not a keyword
    check({"type": "string", "minLength": 2}, "outlines")
    with pytest.raises(GrammarError, match="'minLength'.*combination"):
        check({"type": "string", "pattern": "^a+$", "minLength": 2}, "outlines")
    with pytest.raises(GrammarError, match="format 'date'"):
        check({"type": "string", "format": "date"}, "xgrammar")


def test_normalize_rewrites_to_an_equivalent_or_narrower_schema():
    tagged = {
        "oneOf": [
            {"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"]},
            {"type": "object", "properties": {"kind": {"const": "b"}, "x": {}}, "required": ["kind"]},
        ]
    }
    out = normalize(tagged)
    assert "oneOf" not in out and len(out["anyOf"]) == 2  # disjoint: anyOf means the same
    assert all(b["additionalProperties"] is False for b in out["anyOf"])
    assert "oneOf" in normalize({"oneOf": [{"type": "integer"}, {"type": "number"}]})  # 1 matches both: kept
    assert "oneOf" in normalize({"oneOf": [{"required": ["a"]}, {"required": ["b"]}]})
    assert normalize({"oneOf": [{"type": "string"}, {"type": "null"}]}) == {
        "anyOf": [{"type": "string"}, {"type": "null"}]
    }
    assert normalize({"type": "string", "enum": ["a", 1, None]})["enum"] == ["a"]
    with pytest.raises(GrammarError, match="no value"):
        normalize({"type": "object", "enum": ["a"]})
    assert normalize({"type": "string", "format": "non-blank"}) == {"type": "string"}  # not a standard format
    assert normalize({"properties": {"a": {}}, "required": ["b"]}) == {"properties": {"a": {}}, "required": ["b"]}
    composed = {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    assert normalize(composed) == composed  # closing either branch would contradict the other
    assert (
        normalize({"properties": {"p": {"type": "string", "pattern": r"^\d+$"}}})["properties"]["p"]["pattern"]
        == "^[0-9]+$"
    )


# ---- ASCII regex classes -------------------------------------------------------------------
def test_ascii_classes_rewrites_only_class_escapes():
    from radixrt.constrained.regex import ascii_classes

    assert ascii_classes(r"^\d{4}-\w+\s$") == r"^[0-9]{4}-[0-9A-Za-z_]+[ \t\n\r\f\v]$"
    assert ascii_classes(r"[\d.]+\D") == r"[0-9.]+[^0-9]"
    assert ascii_classes(r"\\d\[\d\]") == r"\\d\[[0-9]\]"  # an escaped backslash, escaped brackets
    assert ascii_classes(r"[]\d][^]\w]") == r"[]0-9][^]0-9A-Za-z_]"
    assert ascii_classes(r"[^\D]") == r"[^\D]"  # negated class inside a class: left alone


# ---- lenient schemas (response_format strict false): what is dropped, and only that ------------
def test_relax_drops_what_the_backend_would_refuse_and_names_it():
    from radixrt.constrained.lenient import enforced, regular_pattern, relax

    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "minLength": 2}, "uniqueItems": True},
            "n": {"oneOf": [{"type": "integer"}, {"type": "number"}]},
            "kind": {"oneOf": [{"const": "a"}, {"const": "b"}]},  # disjoint: enforced as it is, unreported
            "a/b": {"type": "integer", "not": {"const": 3}},
            "id": {"type": "string", "pattern": "^(?!0)[0-9]+$", "format": "non-standard"},
        },
    }
    relaxed, dropped = relax(schema, "xgrammar", regular_pattern)
    assert sorted(dropped) == [
        "/properties/a~1b/not",
        "/properties/id/pattern",
        "/properties/n/oneOf",
        "/properties/tags/items/minLength",
        "/properties/tags/uniqueItems",
    ]
    assert relaxed["properties"]["n"] == {"anyOf": [{"type": "integer"}, {"type": "number"}]}
    assert relaxed["properties"]["kind"] == {"anyOf": [{"const": "a"}, {"const": "b"}]}
    assert relaxed["additionalProperties"] is False  # closed once nothing open-world is left
    check(relaxed, "xgrammar")  # what is left, xgrammar enforces
    assert normalize(enforced(schema, dropped)) == relaxed  # the list rebuilds exactly what was compiled
    assert schema["properties"]["tags"]["uniqueItems"] is True  # the caller's schema is not touched
    no_ops = {"type": "array", "uniqueItems": False, "then": {"minItems": 1}, "minContains": 2, "format": "x-list"}
    assert relax(no_ops, "xgrammar", regular_pattern) == ({"type": "array"}, [])  # constrain nothing: unreported
    structural = {"allOf": [{"type": "object"}], "not": {"type": "null"}}
    relaxed, dropped = relax(structural, "xgrammar", regular_pattern)
    assert dropped == ["/not"]
    with pytest.raises(GrammarError, match="allOf"):  # never dropped: the schema is refused
        check(relaxed, "xgrammar")


def test_regular_pattern_finds_what_no_automaton_compiles():
    from radixrt.constrained.lenient import regular_pattern

    for pattern in ["^(?=.*[A-Z]).{8,}$", "(?!x)y", "(?<=\\$)[0-9]+", "(?<!a)b", "(a)\\1", "\\bword\\b", "\\k<n>"]:
        assert not regular_pattern(pattern), pattern
    for pattern in ["^[a-z]+$", "\\(?=\\)", "[(?=]", "[\\b]", "(?:ab)+", "(?<name>ab)", "\\\\1", "[]\\1]"]:
        assert regular_pattern(pattern), pattern


def test_the_report_is_bounded():
    """A hostile schema cannot make the response large: at most MAX_REPORTED pointers, each short."""
    from radixrt.constrained.lenient import MAX_POINTER_CHARS, MAX_REPORTED, regular_pattern, relax, report

    many = {"type": "object", "properties": {f"p{i}": {"type": "array", "uniqueItems": True} for i in range(500)}}
    shown = report(relax(many, "xgrammar", regular_pattern)[1])
    assert len(shown) == MAX_REPORTED + 1 and shown[-1] == f"… and {500 - MAX_REPORTED:,} more"
    deep = {"type": "object", "properties": {"x" * 5000: {"type": "array", "uniqueItems": True}}}
    (pointer,) = report(relax(deep, "xgrammar", regular_pattern)[1])
    assert len(pointer) == MAX_POINTER_CHARS and pointer.endswith("…")
