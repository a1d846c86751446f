"""The package's import graph, including imports inside functions, has no cycle.

Layers read top-down (server -> frontend -> worker -> scheduler/runner/constrained -> model/attention
-> cache): a module that imports a higher one, directly or around a loop, is a cycle here.
Importing `a.b.c` also runs the package `a.b`'s __init__, so that counts as an import of `a.b`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "radixrt"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """Edges from each module to the radixrt modules it imports anywhere in its body."""
    modules = module_names()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{module}.{a.name}" for a in node.names]
                # `from pkg import submodule` depends on the submodule, not on everything pkg holds
                targets = subs if all(s in modules for s in subs) else [module]
            else:
                continue
            found = {t for t in map(known, targets) if t}
            # importing a.b.c runs a/__init__ and a/b/__init__ first (except the importer's own packages)
            own = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
            found |= {p for t in found for p in parents(t) if p in modules and p not in own}
            graph[name].update(found - {name})
    return graph


def parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(2, len(parts))]  # not the top package: its __init__ is lazy


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "radixrt.engine" in graph["radixrt.lang.backend.engine"]  # imported inside __init__


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
