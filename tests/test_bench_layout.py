"""bench/ is a set of clients of llmvem: no bench script imports another (so there is no import cycle in bench/,
and what two scripts share lives in the package), and every current results file is strict JSON (no NaN or
Infinity; superseded files under bench/results/archive/ are not checked)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT

BENCH = REPO_ROOT / "bench"
RESULTS = BENCH / "results"


def bench_imports(folder: Path) -> dict[str, list[str]]:
    """For each ``*.py`` in ``folder``: the other scripts of ``folder`` it imports (``import x``, ``from x import
    y``, anywhere in the file, and ``importlib.import_module("x")``)."""
    names = {p.stem for p in folder.glob("*.py")}
    found: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.py")):
        hits: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                hits += [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                hits.append(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                  == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)):
                hits.append(node.args[0].value.split(".")[0])
        others = sorted({h for h in hits if h in names and h != path.stem})
        if others:
            found[path.stem] = others
    return found


def _refuse(name: str):
    raise ValueError(f"{name} is not JSON")


def test_the_check_finds_a_planted_bench_import(tmp_path):
    (tmp_path / "bench_a.py").write_text("import numpy as np\nfrom llmvem.config import load_config\n")
    (tmp_path / "bench_b.py").write_text("def f():\n    import bench_a\n    return bench_a\n")
    (tmp_path / "bench_c.py").write_text("import importlib\nm = importlib.import_module('bench_b')\n"
                                         "from bench_a import f\n")
    assert bench_imports(tmp_path) == {"bench_b": ["bench_a"], "bench_c": ["bench_a", "bench_b"]}


def test_no_bench_script_imports_another():
    scripts = list(BENCH.glob("*.py"))
    assert len(scripts) > 5  # the check reads the real folder
    found = bench_imports(BENCH)
    assert not found, "bench scripts importing other bench scripts (move what they share into llmvem): " + "; ".join(
        f"{a} -> {', '.join(b)}" for a, b in found.items())


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_current_results_file_is_strict_json(path):
    text = path.read_text(encoding="utf-8")
    assert isinstance(json.loads(text, parse_constant=_refuse), dict)


def test_the_strict_parse_refuses_nan():
    with pytest.raises(ValueError, match="NaN is not JSON"):
        json.loads('{"r": NaN}', parse_constant=_refuse)
