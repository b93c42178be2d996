"""The public package: a workflow engine needs nothing from ``workers.*`` or ``cache.*``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import agent_sessions

ROOT = Path(__file__).resolve().parents[2]


def test_every_public_name_is_exported() -> None:
    missing = [name for name in agent_sessions.__all__ if not hasattr(agent_sessions, name)]
    assert missing == []


def test_the_readme_node_example_uses_only_the_public_face() -> None:
    """The code "Using it from a workflow engine" quotes from examples/node_loop.py parses,
    and every name it takes from a package comes from ``agent_sessions`` (the example's own
    helpers aside)."""
    example = ast.parse((ROOT / "examples" / "node_loop.py").read_text())
    imported = {
        alias.asname or alias.name: node.module
        for node in ast.walk(example)
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
        for alias in node.names
    }
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using it from a workflow engine", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"<!-- examples/node_loop.py: \w+ -->\n```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    used = {
        node.id
        for block in blocks
        for node in ast.walk(ast.parse(block))
        if isinstance(node, ast.Name)
    }
    sources = {imported[name] for name in used if name in imported}
    assert sources == {"agent_sessions"}
    assert {name for name in used if name in imported} <= set(agent_sessions.__all__)
