"""The layering rules of docs/architecture.md, checked on every run.

Every import in the package is read from the source (module level, inside
functions, under TYPE_CHECKING alike), so a rule broken anywhere fails here,
not in review.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyslirp"
FRONT_ENDS = ("pyslirp.cli", "pyslirp.api", "pyslirp.cni", "pyslirp.kubevirt", "pyslirp.shim")
#: What the sans-I/O stack may never import: it reads no clock and touches no fd.
STACK_FORBIDDEN = ("asyncio", "socket", "os", "time", "select", "threading", "subprocess",
                   "selectors", "uvloop")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}


MODULES = _modules()


def _imports(name: str, tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in ``tree``, relative ones resolved."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            yield node.lineno, base
            for alias in node.names:  # `from pyslirp.runtime import main` imports a module
                if f"{base}.{alias.name}" in MODULES:
                    yield node.lineno, f"{base}.{alias.name}"


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _violations(layer: str, allowed_ours: tuple[str, ...] | None,
                forbidden: tuple[str, ...] = ()) -> list[str]:
    found = []
    for name, tree in MODULES.items():
        if not _within(name, (layer,)):
            continue
        for line, imported in _imports(name, tree):
            ours = _within(imported, ("pyslirp",))
            if ours and allowed_ours is not None and not _within(imported, allowed_ours) \
                    and imported != "pyslirp":
                found.append(f"{name}:{line} imports {imported}")
            if _within(imported, forbidden):
                found.append(f"{name}:{line} imports {imported}")
    return found


def test_wire_imports_nothing_of_ours_outside_wire() -> None:
    assert _violations("pyslirp.wire", ("pyslirp.wire",)) == []


def test_stack_imports_only_wire_and_stack_and_no_io() -> None:
    assert _violations("pyslirp.stack", ("pyslirp.wire", "pyslirp.stack"), STACK_FORBIDDEN) == []


def test_runtime_imports_no_front_end() -> None:
    assert _violations("pyslirp.runtime", None, FRONT_ENDS) == []


def test_no_import_cycles() -> None:
    graph = {name: {m for _, m in _imports(name, tree) if m in MODULES and m != name}
             for name, tree in MODULES.items()}
    # A package's __init__ importing its own submodules is not a cycle worth the name.
    for name in graph:
        graph[name] = {m for m in graph[name] if not (_is_package(m) and name.startswith(m))}
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


def _boundary_functions() -> Iterator[tuple[str, str]]:
    """(runtime module, function) pairs that front ends import by name."""
    for name, tree in MODULES.items():
        if not _within(name, FRONT_ENDS):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    _within(node.module, ("pyslirp.runtime",)):
                for alias in node.names:
                    yield node.module, alias.name


@pytest.mark.parametrize(("module", "function"), sorted(set(_boundary_functions())))
def test_no_untyped_any_at_the_front_end_runtime_boundary(module: str, function: str) -> None:
    """What a front end hands the runtime is typed (runtime/spec.py), never ``Any``."""
    tree = MODULES.get(module)
    if tree is None:
        pytest.skip(f"{module} is a package")
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            untyped = [a.arg for a in node.args.args + node.args.kwonlyargs
                       if isinstance(a.annotation, ast.Name) and a.annotation.id == "Any"]
            assert untyped == [], f"{module}.{function}: parameters typed Any: {untyped}"
