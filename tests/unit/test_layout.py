"""The shape of the package, checked: small modules, no import cycles, no reaching into
another module's private names, one exception root, the library never prints.

Imports inside functions count too: a cycle hidden by a lazy import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mento_fab"
#: "about 500 lines" (issue 13); a module that needs more should be split.
MAX_LINES = 520


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import statement, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    # Imports for type checkers only never run: not an edge.
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [alias.name for alias in node.names]
            submodules = [n for n in names if f"{base}.{n}" in MODULES]
            found += [(f"{base}.{n}", []) for n in submodules]
            found.append((base, [n for n in names if n not in submodules]))
    return [(m, n) for m, n in found if m.startswith("mento_fab")]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        edges = {m for m, _ in _imports(name, path) if m in MODULES and m != name}
        # A package's own __init__ is not an edge from its submodules (Python runs it first
        # anyway), and the lazy re-exports of mento_fab/__init__ are not imports.
        graph[name] = {m for m in edges if not name.startswith(m + ".")}
    return graph


def test_no_module_is_longer_than_about_500_lines() -> None:
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = [
        f"{name} imports {module}.{taken}"
        for name, path in MODULES.items()
        for module, names in _imports(name, path)
        for taken in names
        if taken.startswith("_") and not taken.startswith("__") and module != name
    ]
    assert not offenders


def test_one_exception_root() -> None:
    from mento_fab import errors

    roots = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception"))
                for b in node.bases
            ):
                roots.append((name, node.name))
    outside = [(m, c) for m, c in roots if m != "mento_fab.errors" and not c.startswith("_")]
    assert not outside, "exceptions belong in mento_fab/errors.py"
    for cls in vars(errors).values():
        ours = isinstance(cls, type) and cls.__module__ == errors.__name__
        if ours and issubclass(cls, Exception):
            assert issubclass(cls, errors.MentoError)


#: Shipped to the nodes and run there, where a line on stdout is their protocol.
NODE_SIDE = {"mento_fab.workers.launcher", "mento_fab.workers.supervisor"}


@pytest.mark.parametrize(
    "name", sorted(n for n in MODULES if not n.startswith("mento_fab.cli") and n not in NODE_SIDE)
)
def test_the_library_never_prints(name: str) -> None:
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    calls = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    ]
    assert not calls, f"{name} prints at lines {calls}"
