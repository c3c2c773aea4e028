"""The house as built: imports run downward, nothing imports the package root, rooms stay small.

Read from the source with `ast` (nothing is imported), so a cycle fails here even where
Python's import order happens to tolerate it — under threads (a Dask worker unpickling its
first tasks on two threads) such a cycle deadlocks or sees a half-initialised module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffdask"
#: Longest module without a reason written in its docstring (a line "Size: ...").
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """Every diffdask module ``name`` imports (at any depth of the file), with the line."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub if sub in modules else base, node.lineno))
    return [(m, line) for m, line in found if m == "diffdask" or m.startswith("diffdask.")]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m, _ in _imports(name, path, modules) if m != name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (break them: the lower module must not import the upper one):\n" + "\n".join(
        " ↔ ".join(c) for c in cycles
    )


def test_no_module_imports_the_package_root():
    modules = _modules()
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for name, path in modules.items()
        if name != "diffdask"
        for m, line in _imports(name, path, modules)
        if m == "diffdask"
    ]
    assert not offenders, f"modules that import the package root (import from the submodule instead): {offenders}"


#: Which floors may not import which: algorithms never reach up into the CLI, figures or the
#: cluster connection (DESIGN.md §3).
UPPER_FLOORS = ("diffdask.cli", "diffdask.viz", "diffdask.cluster", "diffdask.pipeline", "diffdask.demo")
BASEMENT = ("diffdask.errors", "diffdask.checks", "diffdask._version", "diffdask.backend", "diffdask.geometry",
            "diffdask.frames")


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_imports_run_downward():
    graph = _graph()
    wrong = [
        f"{a} → {b}"
        for a, targets in graph.items()
        for b in targets
        if a != "diffdask"
        and (
            (_under(b, UPPER_FLOORS) and not _under(a, UPPER_FLOORS))
            or (_under(a, BASEMENT) and not _under(b, BASEMENT))
        )
    ]
    assert not wrong, "imports that climb a floor:\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_are_small_or_say_why(name):
    path = _modules()[name]
    lines = path.read_text().count("\n")
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= MAX_LINES or "Size:" in doc, (
        f"{path.relative_to(PACKAGE.parent)} has {lines} lines (> {MAX_LINES}); split it by what it holds, or say "
        "in its docstring (a line 'Size: ...') why it is one module."
    )


def test_lazy_root_loads_no_submodule():
    import subprocess
    import sys

    code = (
        "import sys, diffdask as dd; before = sorted(m for m in sys.modules if m.startswith('diffdask.'));"
        "dd.summarize; after = 'diffdask.reduce' in sys.modules;"
        "missing = [n for n in dd.__all__ if not hasattr(dd, n)];"
        "print(before, after, missing)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['diffdask._version'] True []"
