"""``examples/node_loop.py`` runs as it is, and the README quotes it exactly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.integration.support import make_ctx, settings_env
from tests.servers import Database, with_database

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node_loop.py"
README = ROOT / "README.md"
REGION = re.compile(
    r"# --8<-- \[start:(?P<name>\w+)\]\n(?P<code>.*?)\n*# --8<-- \[end:(?P=name)\]", re.S
)
QUOTE = re.compile(
    r"<!-- examples/node_loop\.py: (?P<name>\w+) -->\n```python\n(?P<code>.*?)```", re.S
)


def regions(text: str) -> dict[str, str]:
    return {m["name"]: m["code"].rstrip("\n") + "\n" for m in REGION.finditer(text)}


def test_the_readme_quotes_the_example_exactly() -> None:
    """Each README block marked `<!-- examples/node_loop.py: NAME -->` is the example's
    region NAME, character for character; every region is quoted."""
    quoted = {m["name"]: m["code"] for m in QUOTE.finditer(README.read_text(encoding="utf-8"))}
    shipped = regions(EXAMPLE.read_text(encoding="utf-8"))
    assert set(shipped) == {"node", "workflow", "conversation"}
    assert quoted == shipped


def run_example(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_the_example_runs_the_node_loop_end_to_end(
    redis_client: redis.Redis, redis_url: str, database_url: Database
) -> None:
    """On an empty database with its own key prefix: it migrates, loops, pauses and resumes,
    ends the workflow and the conversation, and sees every session cleaned in Postgres."""
    env = settings_env(make_ctx(redis_url, database_url.url))
    env.pop("ASC_KEY_PREFIX")
    result = run_example(env)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "key prefix asc-example" in out.splitlines()[0]
    assert "migrating the database to" in out
    assert "node entry loop-1: fresh -> completed, saved version 1" in out
    assert "node entry loop-3: resumed version 2 (2 messages) -> completed, saved version 3" in out
    assert re.search(r"node entry ask: .* -> paused for human input \(tool call call-", out)
    assert re.search(r"node entry after-answer: .*, the answer to tool call call-.* version 5", out)
    assert "turn m-4 (config soul-v2): fresh -> completed, saved version 1" in out
    assert "workflow_ended: 1 session(s), 1 cleanup(s)" in out
    assert "conversation_ended: 2 session(s)" in out
    cleaned = [line for line in out.splitlines() if "postgres:" in line]
    assert len(cleaned) == 3 and all(": cleaned (" in line for line in cleaned), out
    assert {"(workflow_end)", "(config_change)", "(conversation_end)"} == {
        re.search(r"\(\w+\)", line).group(0)  # type: ignore[union-attr]
        for line in cleaned
    }
    assert redis_client.exists("asc-example:meta")  # its own key prefix


def test_the_example_on_a_missing_database_says_how_to_create_it(
    redis_client: redis.Redis, redis_url: str, database_url: Database
) -> None:
    env = settings_env(make_ctx(redis_url, database_url.url))
    env["DATABASE_URL"] = with_database(database_url.url, "asc_no_such_database")
    result = run_example(env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "does not exist" in result.stderr and "createdb" in result.stderr


@pytest.mark.parametrize("name", ["node", "workflow", "conversation"])
def test_each_quoted_region_is_whole_code(name: str) -> None:
    """A quoted region compiles on its own: it is whole functions, not a fragment."""
    compile(regions(EXAMPLE.read_text(encoding="utf-8"))[name], f"<{name}>", "exec")
