"""The commands that only look write nothing, to Redis or to Postgres, and say what they used.

Each runs as a subprocess against a key space with sessions in every state (flushed, dirty,
cleaning, given up, parked) and RQ bookkeeping that RQ's own listing would tidy (a dead
worker's registration, expired registry entries), and against an unused key prefix (no
``<prefix>:meta`` yet). Redis' own write counter (``rdb_changes_since_last_save``), its
key count and a digest of every Postgres row must not move.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis
import sqlalchemy as sa
from rq.registry import FailedJobRegistry, StartedJobRegistry

from agent_sessions.lifecycle import SessionLifecycle
from cache.settings import Settings
from persistence.migrate import upgrade
from tests import factories as f
from tests.integration.support import make_ctx, settings_env
from tests.servers import Database
from workers.context import WorkerContext
from workers.drain import drain

TABLES = ("agent_runtime_sessions", "agent_session_owners", "alembic_version")
PARKED = "asc:{s000}:session:a:b:c:d:e"


@pytest.fixture
def ctx(redis_client: redis.Redis, redis_url: str, database_url: Database) -> WorkerContext:
    """A migrated database and a key space holding sessions in every state."""
    upgrade(database_url.url)
    ctx = make_ctx(redis_url, database_url.url)
    keys = [f.session_key(run="run-1", node=f"node-{i}") for i in range(3)]
    for key in keys:
        ctx.cache.save(key, f.session_write())
    drain(ctx)
    SessionLifecycle(ctx).workflow_ended(f.TENANT, "run-1", "failed")  # cleaning, jobs queued
    ctx.cache.mark_cleaned(keys[0], error="cleanup gave up: backend down")
    drain(ctx)
    turn = f.conversation_scope(conversation="chat-1")
    ctx.cache.save(turn.key, f.session_write(of=turn))  # dirty
    ctx.cache.quarantine(0, PARKED, 1, "postgres refused: test", force=True)
    queue = ctx.queue_redis
    queue.sadd("rq:workers", "rq:worker:ghost")  # a dead worker's registration
    queue.sadd(f"rq:workers:{ctx.flush_queue.name}", "rq:worker:ghost")
    queue.zadd(StartedJobRegistry(queue=ctx.flush_queue).key, {"abandoned-job": 1})
    queue.zadd(FailedJobRegistry(queue=ctx.flush_queue).key, {"expired-job": 1})
    for name in redis_client.scan_iter():  # keys about to expire would change the key count
        if 0 <= redis_client.pttl(name) < 60_000:
            redis_client.delete(name)
    return ctx


def written(client: redis.Redis) -> int:
    """Redis' count of changes to its data since it started (it counts every write)."""
    return int(client.info("persistence")["rdb_changes_since_last_save"])


def state(ctx: WorkerContext, client: redis.Redis) -> dict[str, object]:
    """What a write would change: Redis' write counter and key count, every Postgres row."""
    with ctx.repo.engine.connect() as conn:
        rows = {
            table: conn.execute(
                sa.text(
                    f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text),"
                    f" '')) FROM {table} t"
                )
            ).one()
            for table in TABLES
        }
    return {"redis_writes": written(client), "dbsize": client.dbsize(), "postgres": rows}


def run(ctx: WorkerContext, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_sessions", *args],
        env=settings_env(ctx) | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def read_only_commands(ctx: WorkerContext) -> list[tuple[str, ...]]:
    key = f.session_key(run="run-1", node="node-1")
    turn = f.conversation_scope(conversation="chat-1")
    conversation = turn.key
    assert conversation is not None
    return [
        ("stats",),
        ("stats", "--json"),
        ("inspect", "session", *key.parts()),
        ("inspect", "session", *key.parts(), "--full", "--json"),
        ("inspect", "run", f.TENANT, "run-1"),
        ("inspect", "conversation-session", *conversation.parts(), "--full"),
        ("inspect", "conversation", f.TENANT, "chat-1", "--json"),
        ("health",),
        ("health", "--local", "--json"),
        ("cleanup", "list"),
        ("poison", "list", "--json"),
        ("poison", "show", PARKED),
        ("audit",),
        ("migrate", "current"),
    ]


def says_what_it_used(result: subprocess.CompletedProcess[str], settings: Settings) -> None:
    """The first line names the Redis, the key prefix and the database; or `using` in JSON."""
    if result.stdout.startswith("{"):
        used = json.loads(result.stdout)["using"]
        assert used["key_prefix"] == settings.key_prefix
        assert used["redis"] == settings.redis_url and "database" in used
    else:
        first = result.stdout.splitlines()[0]
        assert first.startswith("using ") and f"key prefix {settings.key_prefix}" in first
        assert settings.database_url in first


def check_writes_nothing(
    ctx: WorkerContext, client: redis.Redis, args: tuple[str, ...], **env: str
) -> None:
    before = state(ctx, client)
    result = run(ctx, *args, **env)
    assert result.returncode in (0, 1), result.stderr  # 1: unhealthy, a fault, not found
    assert "Traceback" not in result.stderr, result.stderr
    assert state(ctx, client) == before, f"agent-sessions {' '.join(args)} wrote"
    settings = ctx.settings.model_copy(update={"key_prefix": env.get("ASC_KEY_PREFIX", "asc")})
    says_what_it_used(result, settings)


def test_commands_that_look_write_nothing(ctx: WorkerContext, redis_client: redis.Redis) -> None:
    for args in read_only_commands(ctx):
        check_writes_nothing(ctx, redis_client, args)
    assert redis_client.sismember("rq:workers", "rq:worker:ghost")  # left as it was


def test_they_write_nothing_to_an_unused_key_prefix(
    ctx: WorkerContext, redis_client: redis.Redis
) -> None:
    """`ASC_KEY_PREFIX=nc1 agent-sessions stats` used to record `nc1:meta`."""
    for args in [("stats",), ("health",), ("cleanup", "list"), ("poison", "list"), ("audit",)]:
        check_writes_nothing(ctx, redis_client, args, ASC_KEY_PREFIX="nc1")
    assert not redis_client.exists("nc1:meta")


def test_the_probe_sees_a_write(ctx: WorkerContext, redis_client: redis.Redis) -> None:
    """The same measure moves when a command does write (`flush` queues jobs)."""
    before = state(ctx, redis_client)
    assert run(ctx, "flush").returncode == 0
    assert state(ctx, redis_client)["redis_writes"] != before["redis_writes"]
