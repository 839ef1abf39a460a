"""The module graph: each module imports only what the README's layout section allows,
the README draws exactly the imports the code makes, and no import circle exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "spt_utils"
START, END = "<!-- module-graph -->", "<!-- /module-graph -->"


def drawn_graph() -> dict[str, set[str]]:
    """``module → {modules it may import}`` from the README's block between the markers,
    one ``module → a, b`` line each (``→ —`` for none)."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(START) + len(START) : text.index(END)]
    graph = {}
    for line in block.splitlines():
        match = re.fullmatch(r"\s*(\w+)\s+→\s+(.*?)\s*", line)
        if match:
            targets = match.group(2)
            graph[match.group(1)] = set() if targets == "—" else set(targets.split(", "))
    return graph


def imported_modules(tree: ast.AST) -> set[str]:
    """Top-level ``spt_utils`` modules imported anywhere in ``tree`` (function bodies too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "spt_utils":
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("spt_utils."))
    return found


def code_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        deps = graph.setdefault(parts[0], set())
        deps.update(imported_modules(ast.parse(path.read_text())) - {parts[0]})
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Modules that can reach themselves through the graph."""
    return sorted(m for m in graph if m in reachable(graph, m))


def test_the_readme_draws_exactly_the_imports_of_the_code():
    assert code_graph() == drawn_graph()


def test_no_module_is_on_an_import_circle():
    assert cycles(code_graph()) == []


def test_the_cycle_check_finds_a_planted_circle():
    planted = {**code_graph(), "chat": {"evaluation"}}  # evaluation imports chat
    assert {"chat", "evaluation"} <= set(cycles(planted))


def test_measuring_depends_on_no_training_and_knockout_on_no_evaluation():
    graph = code_graph()
    assert "tuning" not in reachable(graph, "evaluation")
    assert "evaluation" not in reachable(graph, "ablation")
    assert "ablation" not in reachable(graph, "evaluation")
    assert "evaluation" not in reachable(graph, "data")
