"""The package's imports point one way: no cycle among its modules, none among its folders, and
the layers named in docs/architecture.md keep their direction. The graph is built from the
source's AST (every import statement, function-level ones included; imports under
`if TYPE_CHECKING:` are for type checkers only and are left out)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mixtral_jax"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST):
    """Import nodes that run (skipping `if TYPE_CHECKING:` bodies)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom, importer: str) -> set[str]:
    """Package modules an import statement loads (`from a import b` loads a.b when it is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importer's package, up level - 1 more
            package = importer.split(".") if MODULES[importer].name == "__init__.py" else importer.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    return {name for name in names if name in MODULES and name != importer}


def import_graph() -> dict[str, set[str]]:
    return {name: set().union(*(_targets(n, name) for n in _runtime_imports(ast.parse(path.read_text()))))
            for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def folder(module: str) -> str:
    """The package's first-level part a module lives in (a top-level module is its own)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        out.setdefault(folder(module), set()).update(folder(t) for t in targets if folder(t) != folder(module))
    return out


def test_cycle_finder_finds_a_planted_cycle_and_passes_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_function_level_imports_and_skips_type_checking_ones():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mixtral_jax.cli\n"
                     "def f():\n    from mixtral_jax.config import choices\n")
    found = set().union(*(_targets(n, "mixtral_jax.hardware") for n in _runtime_imports(tree)))
    assert found == {"mixtral_jax.config.choices"}


def test_no_import_cycle_among_modules():
    assert find_cycle(import_graph()) is None


def test_no_import_cycle_among_folders():
    assert find_cycle(folder_graph(import_graph())) is None


@pytest.mark.parametrize("lower,upper", [
    ("config", "data"), ("config", "models"), ("config", "training"), ("kernels", "models"),
    ("parallel", "models"), ("models", "training"), ("data", "models"), ("training", "experiments"),
    ("training", "interop"), ("hardware", "config"),
])
def test_layers_point_one_way(lower, upper):
    """`lower` never imports `upper` (directly or through other modules)."""
    folders = folder_graph(import_graph())
    reachable, frontier = set(), [lower]
    while frontier:
        for nxt in folders.get(frontier.pop(), ()):
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert upper not in reachable, f"{lower} reaches {upper}"
