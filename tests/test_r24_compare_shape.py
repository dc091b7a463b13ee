"""Issue 24 item 10: the comparison package's modules import each other one way only (no import cycle)."""
from __future__ import annotations

import ast
from pathlib import Path

import featx.comparison

PACKAGE = "featx.comparison"
ROOT = Path(featx.comparison.__file__).parent


def _imports(path: Path, modules: set) -> set:
    """Sibling modules ``path`` imports anywhere (top level or inside functions), package-relative or absolute."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module or ""
            elif node.level == 0 and (node.module or "").startswith(PACKAGE + "."):
                base = node.module[len(PACKAGE) + 1:]
            elif node.level == 0 and node.module == PACKAGE:
                base = ""
            else:
                continue
            if base:
                found.add(base.split(".")[0])
            else:  # `from . import methods`: the names that are modules
                found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PACKAGE + "."):
                    found.add(a.name[len(PACKAGE) + 1:].split(".")[0])
    return found & modules


def _graph() -> dict:
    modules = {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    return {m: _imports(ROOT / f"{m}.py", modules) - {m} for m in modules}


def _cycle(graph: dict):
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_comparison_modules_import_each_other_one_way():
    graph = _graph()
    assert {"core", "methods", "shots", "render"} <= set(graph)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_public_names_still_import():
    from featx.comparison import CompareResult, CompareSettings, Curve, MethodResult, ShotRun, compare  # noqa: F401
    from featx.comparison.core import MethodResult as M2

    assert M2 is MethodResult
