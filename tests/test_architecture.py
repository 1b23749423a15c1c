"""The package's shape: no import cycle between llmvem modules, no module over 600 lines.

Every ``import`` counts, at module level and inside functions: a function-level import postpones a cycle to call
time but does not remove it (the two modules still need each other). Imports under ``if TYPE_CHECKING:`` count
too: they never run, but they still say the two modules know each other's types (the project's import hook
counts them, and so does this test). Importing ``llmvem.a.b`` is an edge to the module ``llmvem.a.b`` only, not to the package
``llmvem.a`` (Python runs ``llmvem/a/__init__.py`` first, but a package importing its own submodules is the
normal layout, and counting it would make every package a cycle); ``from llmvem.a import name`` is an edge to
``llmvem.a.name`` when that is a module, else to ``llmvem.a``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmvem"
MAX_LINES = 600


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str, is_package: bool):
    """Absolute names imported anywhere in ``tree`` (TYPE_CHECKING blocks included)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            yield from ((a.name, None) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield from ((base, a.name) for a in node.names)
        stack.extend(ast.iter_child_nodes(node))


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name → llmvem modules it imports."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for base, item in _imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py"):
            if not base.startswith("llmvem"):
                continue
            target = f"{base}.{item}" if item and f"{base}.{item}" in files else base
            while target not in files and "." in target:  # llmvem.a.b.func → llmvem.a.b
                target = target.rsplit(".", 1)[0]
            if target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "llmvem"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from llmvem.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from llmvem import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from llmvem.sub import b\n"
                              "def g():\n    from .a import x\n")
    graph = import_graph(pkg)
    assert graph["llmvem.a"] == {"llmvem.sub.b"} and graph["llmvem.sub.b"] == {"llmvem.c"}
    assert graph["llmvem.c"] == {"llmvem.a", "llmvem.sub.b"}  # the TYPE_CHECKING import is an edge too
    assert cycles(graph) == [["llmvem.a", "llmvem.c", "llmvem.sub.b"]]


def test_no_import_cycle_between_llmvem_modules():
    graph = import_graph()
    assert "llmvem.experiment" in graph and "llmvem.inputs" in graph["llmvem.experiment"]
    found = cycles(graph)
    assert not found, "import cycles between llmvem modules: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_600_lines(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)}: {n} lines (at most {MAX_LINES}); split it by job"
