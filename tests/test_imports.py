"""The package's import graph: imports point one way, with no cycle anywhere (deferred imports inside functions
count too: a cycle that only works because one side imports late is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pipeline

ROOT = Path(pipeline.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + ".") and target != "pipeline":
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_leaves_import_nothing_of_the_project():
    graph = import_graph()
    assert graph["pipeline.runtime.job"] == set() and graph["pipeline.runtime.tasks"] == set()
    assert "pipeline.runtime.module" not in graph["pipeline.runtime.writer"]


def test_imports_point_down():
    """``explain/``, ``store/`` and ``tables/`` know nothing of how they are run or shown; a stage never imports
    another stage (only the record every stage returns, ``stages.result``)."""
    upward = []
    for name, targets in import_graph().items():
        layer = name.partition(".")[2].partition(".")[0]
        for target in targets:
            above = target.partition(".")[2].partition(".")[0] in ("runtime", "stages", "report", "bench")
            if (layer in ("explain", "store", "tables") and above) or (
                layer == "stages" and target.startswith("pipeline.stages.") and target != "pipeline.stages.result"
            ):
                upward.append(f"{name} -> {target}")
    assert upward == []
