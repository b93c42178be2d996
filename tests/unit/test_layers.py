"""The import graph: one way down the layers, no cycle between modules.

``agent_sessions → workers → (agent_backend, persistence) → cache → lua``; the two in the
middle do not import each other, and ``agent_backend`` knows nothing of RQ.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RANK = {"lua": 0, "cache": 1, "persistence": 2, "agent_backend": 2, "workers": 3}
RANK["agent_sessions"] = 4
PACKAGES = tuple(RANK)


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Absolute module names ``path`` imports (every import, or those run on import)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


MODULES = modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_points_up_a_layer_or_across_the_middle(name: str) -> None:
    own = name.split(".", maxsplit=1)[0]
    for imported in imports(MODULES[name], top_level_only=False):
        top = imported.split(".")[0]
        if top not in RANK or top == own:
            continue
        assert RANK[top] < RANK[own], f"{name} imports {imported}"


def test_the_backend_protocol_knows_nothing_of_rq_redis_or_postgres() -> None:
    banned = {"rq", "redis", "sqlalchemy", "psycopg", "persistence", "workers"}
    for name, path in MODULES.items():
        if name.startswith("agent_backend"):
            tops = {imported.split(".")[0] for imported in imports(path, top_level_only=False)}
            assert not tops & banned, f"{name} imports {sorted(tops & banned)}"


def test_no_cycle_between_modules() -> None:
    graph = {
        name: {m for m in imports(path, top_level_only=True) if m in MODULES and m != name}
        for name, path in MODULES.items()
    }
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            cycle = " -> ".join((*path[path.index(name) :], name))
            raise AssertionError(f"import cycle: {cycle}")
        if name in done:
            return
        for imported in graph[name]:
            visit(imported, (*path, name))
        done.add(name)

    for name in graph:
        visit(name, ())
