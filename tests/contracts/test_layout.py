"""The shape of the package, held as tests: imports run only downwards through the floors ARCHITECTURE.md names,
no module imports itself back through others, and no file or function grows past what one reader takes in.
Lazy imports inside functions count: they are dependencies all the same."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "diffuse"

# Floors from the ground up; a module may import its own floor or lower ones. The longest matching prefix decides.
FLOORS = [
    (
        "diffuse.errors",
        "diffuse.validate",
        "diffuse.io",
        "diffuse.console",
        "diffuse.signals",
        "diffuse.distributed",
        "diffuse.plot",
        "diffuse.rundir.stamp",
        "diffuse.rundir.lock",  # interop refuses to write into a checkpoint a live run holds
    ),
    ("diffuse.conf", "diffuse.images", "diffuse.checkpoint"),
    ("diffuse.nets", "diffuse.data", "diffuse.diffusion", "diffuse.fastpath"),
    ("diffuse.pipeline",),
    ("diffuse.metrics",),  # feature networks are loaded from checkpoints through the pipeline
    ("diffuse.interop", "diffuse.training", "diffuse.scoring"),
    ("diffuse.rundir",),
    ("diffuse.tasks",),
    ("diffuse.overrides", "diffuse.commands", "diffuse.conf_help", "diffuse.cli", "diffuse.__main__", "diffuse"),
]
# Known debt of issue 25, measured when this test was written: each entry leaves the list when its room is rebuilt,
# and nothing may join it.
KNOWN_UPWARD: set[tuple[str, str]] = set()
KNOWN_CIRCLES = []
KNOWN_LONG: set[str] = set()
KNOWN_BENCH: set[str] = set()
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    for path in sorted((ROOT / "conf").glob("*.py")):  # conf/ ships as the package diffuse.conf
        mods["diffuse.conf" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _floor(name: str) -> int:
    best, floor = -1, None
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, floor = len(p), i
    assert floor is not None, f"{name} is on no floor: add it to FLOORS (and to ARCHITECTURE.md)"
    return floor


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_imports_run_downwards(graph):
    upward = [
        f"{a} (floor {_floor(a)}) imports {b} (floor {_floor(b)})"
        for a, deps in graph.items()
        for b in deps
        if _floor(b) > _floor(a) and (a, b) not in KNOWN_UPWARD
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circle(graph):
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert [c for c in circles if c not in KNOWN_CIRCLES] == []


def test_files_and_functions_stay_short():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = path.read_text()
        rel = path.relative_to(ROOT)
        if len(src.splitlines()) > MAX_FILE_LINES:
            long.append((str(rel), f"{rel}: {len(src.splitlines())} lines"))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append((f"{rel}::{node.name}", f"{rel}:{node.lineno} {node.name}: {n} lines"))
    new = [shown for key, shown in long if key not in KNOWN_LONG]
    assert not new, "\n".join(new)


def test_bench_imports_no_task_and_leaves_sys_path_alone():
    bad = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        src = path.read_text()
        if "sys.path" in src:
            bad.append(f"{path.name}: edits sys.path")
        for node in ast.walk(ast.parse(src)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            bad += [
                f"{path.name}: imports {n}" for n in names if n == "diffuse.tasks" or n.startswith("diffuse.tasks.")
            ]
    assert [b for b in bad if b not in KNOWN_BENCH] == []
