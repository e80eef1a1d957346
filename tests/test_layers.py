"""The layering of `generalmodel/`: a stage imports the stages before it, never after, and no
module imports itself back through others. The order is the one docs/architecture.md states (its
line starting "**The order**"), so the map and the code cannot drift apart. Imports inside
functions count: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "generalmodel"


def documented_order() -> list[str]:
    for line in (REPO / "docs/architecture.md").read_text().splitlines():
        if line.startswith("**The order**"):
            return re.findall(r"`([a-z_]+)`", line)
    raise AssertionError("docs/architecture.md has no line starting '**The order**'")


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports (anywhere in it), resolved to module names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def stage(module: str) -> str:
    """generalmodel.train.loop → train; generalmodel.cli → cli; generalmodel → the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph(root: Path = REPO) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def upward_imports(edges: dict[str, set[str]], order: list[str]) -> list[str]:
    rank = {s: i for i, s in enumerate(order)}
    bad = []
    for src, targets in sorted(edges.items()):
        if stage(src) == "__init__":
            continue  # the package root re-exports the base modules
        for dst in sorted(targets):
            if stage(dst) == "__init__" or stage(src) == stage(dst):
                continue
            if rank[stage(dst)] > rank[stage(src)]:
                bad.append(f"{src} imports {dst}: {stage(dst)!r} comes after {stage(src)!r}")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_stage_is_in_the_documented_order():
    order = documented_order()
    assert len(order) == len(set(order)), f"a stage is named twice in docs/architecture.md: {order}"
    stages = {stage(m) for m in graph()} - {"__init__"}
    assert stages == set(order), f"missing from the doc: {stages - set(order)}; not in the code: {set(order) - stages}"


def test_no_stage_imports_a_later_one():
    assert upward_imports(graph(), documented_order()) == []


def test_no_import_loop():
    assert cycles(graph()) == []


BASE = {"errors", "version", "tokens", "__init__"}  # imported anywhere; not listed in the map


def documented_imports() -> dict[str, set[str]]:
    """The map's table in docs/architecture.md: stage → the stages its imports column names."""
    found = {}
    for line in (REPO / "docs/architecture.md").read_text().splitlines():
        match = re.match(r"\| `generalmodel/([a-z_]+)(?:/|\.py)` \|", line)
        if match and match.group(1) not in BASE:
            column = line.rstrip(" |").rsplit("|", 1)[1]
            found[match.group(1)] = {w for w in re.findall(r"\b[a-z_]+\b", column) if w in documented_order()}
    return found


def test_the_map_names_what_each_stage_imports():
    edges = graph()
    actual: dict[str, set[str]] = {}
    for src, targets in edges.items():
        for dst in targets:
            if stage(src) != stage(dst) and stage(dst) not in BASE:
                actual.setdefault(stage(src), set()).add(stage(dst))
    documented = documented_imports()
    stages = {stage(m) for m in edges} - BASE
    assert set(documented) == stages, f"stages without a row in the map: {stages - set(documented)}"
    wrong = {s: (documented[s], actual.get(s, set())) for s in stages if documented[s] != actual.get(s, set())}
    assert not wrong, f"the map's imports column differs from the code (documented, actual): {wrong}"


def test_the_model_zoo_imports_nothing_of_the_platform():
    for path in sorted((REPO / "models").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            assert not any(n.split(".")[0] == PACKAGE for n in names), f"{path.relative_to(REPO)} imports {names}"


@pytest.mark.parametrize(
    "planted, expected",
    [
        ("generalmodel/data/shards.py", "upward"),  # data importing train
        ("generalmodel/train/step.py", "loop"),  # train.step <-> train.loop
    ],
)
def test_the_checks_catch_a_planted_import(tmp_path, planted, expected):
    """A copy of the package with one bad import planted: the checks above must fail on it."""
    import shutil

    shutil.copytree(REPO / PACKAGE, tmp_path / PACKAGE)
    line = "from generalmodel.train.loop import train\n"
    (tmp_path / planted).write_text(line + (tmp_path / planted).read_text())
    edges = graph(tmp_path)
    if expected == "upward":
        assert any(
            "generalmodel.data.shards imports generalmodel.train.loop" in b
            for b in upward_imports(edges, documented_order())
        )
    else:
        assert any({"generalmodel.train.loop", "generalmodel.train.step"} <= set(c) for c in cycles(edges))


def test_no_long_function_in_the_loops_and_the_server():
    """Functions in train/, post/ and serve/ stay under ~60 lines: a longer one mixes concerns."""
    long = []
    for package in ("train", "post", "serve"):
        for path in sorted((REPO / PACKAGE / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                    long.append(f"{path.relative_to(REPO)}::{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
