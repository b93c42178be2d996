"""Setting a deployment up: a missing database or schema is one line that says how to fix it,
for every command; `migrate` speaks Alembic's verbs and prints offline SQL; `--version`."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import psycopg
import pytest
import redis

from persistence.engine import create_engine
from persistence.migrate import current, head, upgrade
from persistence.schema import REVISIONS
from tests.integration.support import make_ctx, settings_env
from tests.integration.test_migrations import schema_diff
from tests.servers import Database, free_port, with_database

ROOT = Path(__file__).resolve().parents[2]
PARKED = "asc:{s000}:session:a:b:c:d:e"
NEED_THE_DATABASE = [  # every command that works on the store, a JSON form of some
    ("stats", "--json"),
    ("inspect", "session", "t", "run", "node", "binding", "agent"),
    ("inspect", "run", "t", "run"),
    ("inspect", "conversation-session", "t", "chat", "binding", "agent", "config"),
    ("inspect", "conversation", "t", "chat", "--json"),
    ("health",),
    ("cleanup", "list"),
    ("cleanup", "retry"),
    ("audit", "--repair", "--json"),
    ("poison", "list"),
    ("poison", "show", PARKED),
    ("poison", "retry", "--all"),
    ("poison", "drop", "--all", "--yes"),
    ("flush",),
    ("flush", "--wait"),
]
UNMIGRATED = [  # one check serves every command: one of each kind
    ("stats",),
    ("inspect", "run", "t", "run"),
    ("health",),
    ("poison", "drop", "--all", "--yes"),
    ("flush", "--wait", "--json"),
]
MIGRATE = [("migrate",), ("migrate", "current"), ("migrate", "downgrade", "0004", "--yes")]


@pytest.fixture
def env(redis_client: redis.Redis, redis_url: str, database_url: Database) -> dict[str, str]:
    """The settings of a database that exists and was never migrated."""
    return settings_env(make_ctx(redis_url, database_url.url))


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_sessions", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def refused(result: subprocess.CompletedProcess[str], *says: str) -> None:
    """Exit status 2 and one line on stderr that says every one of ``says``."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(s in lines[0] for s in says), result.stderr


@pytest.mark.parametrize("args", [*NEED_THE_DATABASE, *MIGRATE], ids=" ".join)
def test_a_missing_database_is_one_line_that_says_how_to_create_it(
    env: dict[str, str], args: tuple[str, ...]
) -> None:
    missing = with_database(env["DATABASE_URL"], "asc_no_such_database")
    result = run(env | {"DATABASE_URL": missing}, *args)
    refused(result, "database 'asc_no_such_database' does not exist", "createdb -h ")
    if "--json" not in args:
        assert result.stdout.startswith("using ") and "asc_no_such_database" in result.stdout


@pytest.mark.parametrize("args", UNMIGRATED, ids=" ".join)
def test_a_database_without_the_schema_says_run_migrate(
    env: dict[str, str], args: tuple[str, ...]
) -> None:
    refused(run(env, *args), f"this build needs {head()}: run `agent-sessions migrate`")


def test_flush_wait_with_nothing_dirty_still_refuses_a_missing_database(
    env: dict[str, str],
) -> None:
    """It used to print drained=True and exit 0: nothing was dirty, so nothing asked."""
    missing = with_database(env["DATABASE_URL"], "asc_no_such_database")
    result = run(env | {"DATABASE_URL": missing}, "flush", "--wait")
    assert result.returncode == 2 and "drained" not in result.stdout


def test_health_local_never_asks_postgres(env: dict[str, str]) -> None:
    """A liveness probe judges this host's pool only: a missing database is not its call."""
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    result = run(env | {"DATABASE_URL": dead}, "health", "--local")
    assert result.returncode == 1 and "no flush trigger" in result.stdout, result.stderr


def test_version_names_the_package_and_the_schema_it_needs(env: dict[str, str]) -> None:
    result = run(env, "--version")
    assert result.returncode == 0, result.stderr
    expected = f"agent-sessions {version('agent-session-cache')} (database schema {head()})"
    assert result.stdout.strip() == expected


def test_migrate_speaks_alembics_verbs(env: dict[str, str]) -> None:
    url = env["DATABASE_URL"]
    assert (
        "revision none (empty database); this build's head is"
        in run(env, "migrate", "current").stdout
    )
    assert run(env, "migrate", "upgrade", "0004").returncode == 0
    assert current(url) == "0004"
    assert f"revision 0004; this build's head is {head()}" in run(env, "migrate", "current").stdout
    plain = run(env, "migrate")  # what the Makefile and the docs run
    assert plain.stdout.splitlines()[0].startswith("using key prefix asc, database ")
    assert f"database schema at revision {head()}" in plain.stdout
    assert f"revision {head()} (head)" in run(env, "migrate", "current").stdout
    asked = run(env, "migrate", "downgrade", "0004")  # no --yes, no terminal: refused
    assert asked.returncode == 1 and current(url) == head()
    assert run(env, "migrate", "downgrade", "0004", "--yes").returncode == 0
    assert current(url) == "0004"
    history = run(env, "migrate", "history").stdout.splitlines()
    assert history[0].startswith(f"{REVISIONS[-2]} -> {head()} (head), ")
    assert history[-1].startswith("<base> -> 0001, ")


def test_migrate_sql_is_the_schema_without_a_database(
    env: dict[str, str], pg_server_url: str, database_url: Database
) -> None:
    """`migrate --sql` needs no database; its script builds exactly the models' schema and
    gives rows that predate 0005 the migrating deployment's prefix."""
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    script = run(env | {"DATABASE_URL": dead, "ASC_KEY_PREFIX": "nc1"}, "migrate", "--sql")
    assert script.returncode == 0, script.stderr
    assert script.stdout.startswith("-- agent-sessions migrate --sql")
    assert "DEFAULT 'nc1'" in script.stdout
    with psycopg.connect(database_url.url, autocommit=True) as conn:
        conn.execute(script.stdout.encode())
    assert current(database_url.url) == head()
    engine = create_engine(database_url.url)
    try:
        with engine.connect() as conn:
            assert schema_diff(conn) == []
    finally:
        engine.dispose()


def test_migrate_sql_of_a_range_and_of_a_downgrade(env: dict[str, str]) -> None:
    later = run(env, "migrate", "upgrade", "0004:head", "--sql").stdout
    assert "Running upgrade 0004 -> 0005" in later and "-> 0001" not in later
    down = run(env, "migrate", "downgrade", "0005:0004", "--sql").stdout
    assert "Running downgrade 0005 -> 0004" in down
    misplaced = run(env, "migrate", "--sql", "current")
    assert misplaced.returncode == 2 and "after the subcommand" in misplaced.stderr


def test_alembics_own_command_line_runs_the_migrations(env: dict[str, str]) -> None:
    """`alembic` with the repository's alembic.ini: the URL and prefix from the environment."""
    alembic = [str(Path(sys.executable).with_name("alembic")), "-c", str(ROOT / "alembic.ini")]

    def call(*args: str) -> str:
        done = subprocess.run(
            [*alembic, *args], env=env, capture_output=True, text=True, timeout=120, check=True
        )
        return done.stdout

    call("upgrade", "head")
    assert current(env["DATABASE_URL"]) == head()
    assert f"{head()} (head)" in call("current")
    engine = create_engine(env["DATABASE_URL"])
    try:
        with engine.connect() as conn:
            assert schema_diff(conn) == []
    finally:
        engine.dispose()


def test_upgrade_refuses_a_missing_database_with_database_missing(pg_server_url: str) -> None:
    """The library call says which database is missing (the CLI adds how to create it)."""
    from persistence.errors import DatabaseMissing

    missing = with_database(pg_server_url, "asc_no_such_database")
    with pytest.raises(DatabaseMissing, match="'asc_no_such_database' does not exist"):
        upgrade(missing)
