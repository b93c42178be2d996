"""``agent-sessions audit``: Redis against Postgres, session by session. Each fault is seeded
by hand, as the holes this project closed would have left it, and the audit must name it."""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest
import redis

from agent_sessions.audit import audit
from cache.records import Owner, SessionKey
from tests import factories as f
from tests.integration.support import make_ctx, settings_env, urgent_flush_queued
from tests.servers import Database
from workers.context import WorkerContext
from workers.drain import drain

TEN_MINUTES_MS = 600_000


@pytest.fixture
def ctx(redis_client: redis.Redis, redis_url: str, migrated: Database) -> WorkerContext:
    return make_ctx(redis_url, migrated.url, shards=2, reconcile_grace_s=1)


def flushed(ctx: WorkerContext) -> None:
    assert drain(ctx, timeout_s=30).drained


def key(node: str, run: str = "run-1") -> SessionKey:
    return f.session_key(node=node, run=run)


def age_dirty_mark(ctx: WorkerContext, session: SessionKey, by_ms: int) -> None:
    name = ctx.cache.keys.session(session)
    dirty = ctx.cache.keys.dirty(ctx.cache.keys.shard_of_key(session))
    ctx.cache.client.zadd(dirty, {name: ctx.cache.server_time_ms() - by_ms}, xx=True)


def test_a_prefix_the_write_behind_keeps_up_with_audits_clean(ctx: WorkerContext) -> None:
    for node in ("a", "b", "c"):
        ctx.cache.save(key(node), f.session_write())
    flushed(ctx)
    ctx.cache.save(key("a"), f.session_write())  # dirty a moment ago: within the bound
    report = audit(ctx)
    assert report.counts == {"agree": 2, "behind_within_bound": 1}
    assert report.faults == 0 and report.as_dict()["ok"] is True


def seed_every_fault(ctx: WorkerContext) -> dict[str, SessionKey]:
    """One session per finding, in the state the fault leaves it."""
    client, cache = ctx.cache.client, ctx.cache
    faults = {name: key(name) for name in ("beyond", "missing", "other", "ahead", "ttl")}
    faults |= {"poisoned": key("poisoned"), "ended": key("ended", run="run-ended")}
    for session in faults.values():
        cache.save(session, f.session_write())
    flushed(ctx)
    for _ in range(2):
        cache.save(faults["ahead"], f.session_write())
    cache.retire(faults["ttl"])
    flushed(ctx)
    client.persist(cache.keys.session(faults["ttl"]))
    cache.save(faults["beyond"], f.session_write())
    age_dirty_mark(ctx, faults["beyond"], TEN_MINUTES_MS)
    missing = key("missing-in-postgres")
    cache.save(missing, f.session_write())
    age_dirty_mark(ctx, missing, TEN_MINUTES_MS)
    faults["missing"] = missing
    client.hset(cache.keys.session(faults["other"]), "content_id", "another-save")
    client.hset(cache.keys.session(faults["ahead"]), mapping={"version": 1, "flushed_version": 1})
    shard = cache.keys.shard_of_key(faults["poisoned"])
    cache.quarantine(shard, cache.keys.session(faults["poisoned"]), 1, "test", force=True)
    client.hset(cache.keys.owner(Owner(f.TENANT, "run-ended")), "state", "ended")
    return faults


def test_the_audit_names_each_fault(ctx: WorkerContext) -> None:
    ctx.cache.save(key("pg-only", run="run-gone"), f.session_write())
    flushed(ctx)
    ctx.repo.record_end(Owner(f.TENANT, "run-gone"), "failed", check_after_s=3600)
    ctx.cache.client.delete(ctx.cache.keys.session(key("pg-only", run="run-gone")))
    with psycopg.connect(ctx.settings.database_url, autocommit=True) as conn:
        conn.execute("UPDATE agent_session_owners SET ended_at = now() - interval '1 hour'")
    faults = seed_every_fault(ctx)
    report = audit(ctx)
    expected = {
        "behind_beyond_bound": 1,
        "missing_in_postgres": 1,
        "same_version_other_content": 1,
        "postgres_ahead": 1,
        "terminal_without_ttl": 1,
        "poisoned": 1,
        "active_in_ended_owner": 2,  # one in Redis, one in Postgres only
    }
    assert {k: v for k, v in report.counts.items() if k != "agree"} == expected
    shown = report.as_dict()["examples"]
    names = {finding: [n.split(" ")[0] for n in ns] for finding, ns in shown.items()}
    assert names["same_version_other_content"] == [ctx.cache.keys.session(faults["other"])]
    assert names["postgres_ahead"] == [ctx.cache.keys.session(faults["ahead"])]
    assert report.as_dict()["ok"] is False


def test_repair_asks_for_what_each_fault_needs_and_nothing_else(ctx: WorkerContext) -> None:
    faults = seed_every_fault(ctx)
    before = ctx.cache.poison_sizes(list(ctx.cache.keys.all_shards()))
    report = audit(ctx, repair=True)
    assert report.repaired == {
        "behind_beyond_bound": 1,
        "missing_in_postgres": 1,
        "terminal_without_ttl": 1,
        "same_version_other_content": 1,
        "postgres_ahead": 1,
        "active_in_ended_owner": 1,
    }
    for name in ("beyond", "missing", "ttl"):
        assert urgent_flush_queued(ctx, ctx.cache.keys.shard_of_key(faults[name]))
    after = ctx.cache.poison_sizes(list(ctx.cache.keys.all_shards()))
    assert sum(after.values()) == sum(before.values()) + 2  # other, ahead: for an operator
    flushed(ctx)
    again = audit(ctx)
    assert again.counts["terminal_without_ttl"] == 0 and again.counts["missing_in_postgres"] == 0


def test_the_command_prints_the_counts_and_exits_1_on_a_fault(ctx: WorkerContext) -> None:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent_sessions", "audit", "--json"],
            env=settings_env(ctx),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ctx.cache.save(key("a"), f.session_write())
    flushed(ctx)
    clean = run()
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["counts"]["agree"] == 1
    ctx.cache.client.hset(ctx.cache.keys.session(key("a")), "content_id", "another-save")
    faulty = run()
    assert faulty.returncode == 1
    assert json.loads(faulty.stdout)["counts"]["same_version_other_content"] == 1
