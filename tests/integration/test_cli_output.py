"""What the operator reads: which services a command used, settings that name nothing,
`inspect --full` as JSON, and shell completion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from persistence.migrate import upgrade
from tests import factories as f
from tests.integration.support import make_ctx, settings_env
from tests.servers import Database
from workers.context import WorkerContext


@pytest.fixture
def ctx(redis_client: redis.Redis, redis_url: str, database_url: Database) -> WorkerContext:
    upgrade(database_url.url)
    return make_ctx(redis_url, database_url.url)


def run(ctx: WorkerContext, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "agent_sessions", *args],
        env=settings_env(ctx) | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_an_unknown_asc_variable_is_said_once_with_the_closest_setting(
    ctx: WorkerContext,
) -> None:
    """`ASC_PREFIX=nc1 agent-sessions stats` meant ASC_KEY_PREFIX: the command still runs
    (with the prefix it was really given) and says so, once."""
    result = run(ctx, "stats", ASC_PREFIX="nc1")
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "ASC_PREFIX" in line]
    assert len(said) == 1, result.stderr
    assert "ASC_PREFIX is not a setting" in said[0] and "did you mean ASC_KEY_PREFIX?" in said[0]
    assert "key prefix asc," in result.stdout.splitlines()[0]


def test_commands_that_write_say_what_they_used(ctx: WorkerContext) -> None:
    ctx.cache.save(f.session_key(), f.session_write())
    redis_url, database = ctx.settings.redis_url, ctx.settings.database_url
    first = f"using redis {redis_url}, key prefix asc, database {database}"
    assert run(ctx, "flush").stdout.splitlines()[0] == first
    assert run(ctx, "cleanup", "retry").stdout.splitlines()[0] == first
    drained = json.loads(run(ctx, "flush", "--wait", "--json").stdout.splitlines()[-1])
    assert drained["using"] == {"redis": redis_url, "key_prefix": "asc", "database": database}
    assert drained["drained"] is True
    retried = run(ctx, "poison", "retry", "--all", "--json")
    assert json.loads(retried.stdout)["using"]["key_prefix"] == "asc"


def test_inspect_full_prints_the_snapshot_and_specs_as_json(ctx: WorkerContext) -> None:
    """The human outline shows the whole snapshot as JSON: types survive, no Python reprs."""
    key = f.session_key()
    state = {"n": 1, "text": "1", "empty": [], "nested": {"list": [1, "two", None]}}
    ctx.cache.save(key, f.session_write(f.snapshot("prompt", "history", state=state)))
    out = run(ctx, "inspect", "session", *key.parts(), "--full").stdout
    assert "(" not in out, "a Python tuple's repr"
    snapshot = json.loads(json_block(out.splitlines(), "    snapshot:"))
    assert [layer["runtime_state"] for layer in snapshot["layers"]] == [state, state]
    specs = json.loads(json_block(out.splitlines(), "    layer_specs:"))
    assert isinstance(specs, list) and all("name" in spec for spec in specs)


def json_block(lines: list[str], header: str) -> str:
    """The JSON printed under ``header``: the lines indented deeper than it."""
    start = lines.index(header) + 1
    depth = len(header) - len(header.lstrip()) + 2
    block = []
    for line in lines[start:]:
        if len(line) - len(line.lstrip()) < depth:
            break
        block.append(line)
    return "\n".join(block)


def test_shell_completion_of_the_installed_script(ctx: WorkerContext) -> None:
    """The README's `_AGENT_SESSIONS_COMPLETE=bash_source agent-sessions` works, and the
    script completes commands."""
    script = str(Path(sys.executable).with_name("agent-sessions"))
    env = settings_env(ctx)

    def complete(**extra: str) -> str:
        done = subprocess.run(
            [script], env=env | extra, capture_output=True, text=True, timeout=60, check=True
        )
        return done.stdout

    source = complete(_AGENT_SESSIONS_COMPLETE="bash_source")
    assert "_agent_sessions_completion" in source and "complete " in source
    words = complete(
        _AGENT_SESSIONS_COMPLETE="bash_complete", COMP_WORDS="agent-sessions mig", COMP_CWORD="1"
    )
    assert "plain,migrate" in words.splitlines()
    words = complete(
        _AGENT_SESSIONS_COMPLETE="bash_complete",
        COMP_WORDS="agent-sessions migrate ",
        COMP_CWORD="2",
    )
    assert {"plain,current", "plain,history", "plain,upgrade"} <= set(words.splitlines())
