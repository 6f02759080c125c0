"""The packages are layers: manifests, then jobs, then workers, then the command line; each
imports only from itself and the layers below. The sandbox stands alone (the real service knows
nothing of its clients). Imports inside functions count as much as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"manifests": 0, "jobs": 1, "celeryconfig": 1, "workers": 2, "cli": 3}
ALONE = "sandbox"


def modules() -> dict[str, Path]:
    found = {"celeryconfig": ROOT / "celeryconfig.py"}
    for package in (*LAYERS, ALONE):
        for path in sorted((ROOT / package).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module `name` imports, anywhere in its body."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, [package, base]))
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        out.update(t for t in targets if t in known and t != name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def top(module: str) -> str:
    return module.partition(".")[0]


def upward(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in edges.items():
        for dst in targets:
            a, b = top(src), top(dst)
            if a == b:
                continue
            if a == ALONE or (b == ALONE and a != "cli") or (b != ALONE and LAYERS[b] > LAYERS[a]):
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_package_is_walked() -> None:
    edges = graph()
    assert {top(m) for m in edges} == {*LAYERS, ALONE}
    assert len(edges) > 60  # the walk found the modules, not an empty tree


def test_no_import_runs_up_a_layer_or_into_the_sandbox() -> None:
    assert upward(graph()) == []


def test_no_import_circle() -> None:
    assert cycles(graph()) == []


def test_the_checks_catch_what_they_look_for() -> None:
    """The two checks on a made-up graph: an upward import, a sandbox import and a circle."""
    edges = {
        "jobs.runs": {"workers.tasks"},
        "sandbox.app": {"jobs.models"},
        "workers.tasks": {"workers.steps"},
        "workers.steps": {"workers.tasks"},
        "cli.main": {"sandbox.command", "workers.tasks"},
    }
    assert upward(edges) == ["jobs.runs -> workers.tasks", "sandbox.app -> jobs.models"]
    assert cycles(edges) == [["workers.steps", "workers.tasks"]]
