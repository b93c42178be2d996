"""The documentation points only at what exists, and only inside the repository.

Checked in README.md, docs/*.md and examples/*.md: every relative markdown link
(``[text](path)``, resolved from the document's folder) and every backticked repository path
(``bench/hot_path.py``, ``docs/deploy/``: a token with a ``/`` that ends in an extension or a
``/``, resolved from the repository root). Nothing in those documents or in the project's
source may point outside the repository (``../shared/...``, an absolute path to a
``shared/reference`` folder): a reader of the repository cannot follow it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*.md")]
)
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\s]+)`")
PATH_LIKE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_./-]*(/|\.[A-Za-z][A-Za-z0-9]{0,4})$")
NOT_A_FILE = ("http://", "https://", "mailto:", "#")
GENERATED = (".run/", ".venv/", "bench/results/")
"""Folders made by `make services`, `make setup` and the benchmarks, not by a checkout."""
OUTSIDE = re.compile(r"\.\./shared\b|/shared/reference\b|(?<![\w.])/work/")
SOURCES = ("*.py", "*.md", "*.toml", "*.ini", "*.sh", "*.yaml", "*.service", "*.lua", "Makefile")


def _lines(document: Path) -> Iterator[tuple[int, str]]:
    """The document's lines outside fenced code blocks (commands there are examples)."""
    fenced = False
    for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield number, line


def _where(document: Path, number: int) -> str:
    return f"{document.relative_to(ROOT)}:{number}"


def links(document: Path) -> Iterator[tuple[str, str]]:
    """``(where, target)`` of each relative markdown link, without its ``#anchor``."""
    for number, line in _lines(document):
        for target in LINK.findall(line):
            if not target.startswith(NOT_A_FILE):
                yield _where(document, number), target.split("#", 1)[0]


def repository_paths(document: Path) -> Iterator[tuple[str, Path]]:
    """``(where, path)`` of each backticked token that names a repository file or folder.

    A token may be short for a path under a folder named before it on the same line
    (``persistence/models.py``, ``migrations/``): it is resolved there if it exists there."""
    for number, line in _lines(document):
        bases = [ROOT]
        for token in CODE.findall(line):
            if "/" not in token or token.startswith(GENERATED):
                continue
            found = next((b / token for b in bases if (b / token).exists()), ROOT / token)
            bases += [d for d in (found, *found.parents) if _inside(d) and d.is_dir()]
            if PATH_LIKE.match(token):
                yield _where(document, number), found


def _inside(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_relative_link_exists_inside_the_repository(document: Path) -> None:
    broken = [
        f"{where}: {target}"
        for where, target in links(document)
        if not _inside(document.parent / target) or not (document.parent / target).exists()
    ]
    assert broken == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_backticked_repository_path_exists(document: Path) -> None:
    missing = [
        f"{where}: {path.relative_to(ROOT) if _inside(path) else path}"
        for where, path in repository_paths(document)
        if not _inside(path) or not path.exists()
    ]
    assert missing == []


def _sources() -> Iterator[Path]:
    skip = {".venv", ".run", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
    for pattern in SOURCES:
        for path in ROOT.rglob(pattern):
            parts = path.relative_to(ROOT).parts
            if not skip.intersection(parts) and not any(p.endswith(".egg-info") for p in parts):
                yield path


def test_nothing_points_outside_the_repository() -> None:
    """No document or source file names a path outside the checkout."""
    this = Path(__file__).resolve()
    found = [
        f"{path.relative_to(ROOT)}:{number}: {match.group(0)}"
        for path in sorted(set(_sources()))
        if path.resolve() != this
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for match in [OUTSIDE.search(line)]
        if match
    ]
    assert found == []


def test_the_checks_see_links_and_paths() -> None:
    """The patterns find what they are for (a check that finds nothing proves nothing)."""
    readme = ROOT / "README.md"
    assert ("README.md:1", "docs/design.md") in [
        ("README.md:1", target) for _, target in links(readme)
    ]
    tokens = {path for _, path in repository_paths(ROOT / "docs" / "design.md")}
    assert {ROOT / "lua/prelude.lua", ROOT / "agent_sessions/lifecycle.py"} <= tokens
    assert ROOT / "persistence/migrations/" in tokens  # `migrations/` after its folder
    for not_a_path in ("asc:{s113}:dirty", "redis/rediss/unix", "/runs/{id}", "0.3/1.2"):
        assert not (PATH_LIKE.match(not_a_path) and "/" in not_a_path), not_a_path
    assert OUTSIDE.search("see ../shared/DESIGN.md") and OUTSIDE.search("/work/x/y.md")
