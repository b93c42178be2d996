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


def test_the_readme_node_example_imports_only_the_public_face() -> None:
    """The "Using it from a workflow engine" example parses and imports from agent_sessions."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using it from a workflow engine", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    tree = ast.parse(code.group(1))
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules == {"agent_sessions"}
    names = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert names <= set(agent_sessions.__all__)
