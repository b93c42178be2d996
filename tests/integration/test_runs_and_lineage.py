"""The run's end and each session's lineage as durable facts (issue #9 of the design notes).

Redis may lose keys: eviction under ``volatile-*``, a restart without AOF, a failover. Each
test takes one way the landed code broke "nothing of an ended run is resumable", "Postgres
never silently disagrees with Redis" or "every ended run is cleaned" when that happened.
Real private redis-server, real Postgres, real ``agent-sessions worker`` where it matters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import psycopg
import pytest
import redis

from agent_backend.client import AgentBackendClient
from agent_backend.models import CreateRunRequest
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.outcomes import Entry, NodeResult, RunOutcome
from agent_sessions.testing.fake_backend import FakeAgentBackend
from cache.records import Owner, Scope, SessionKey, SessionStatus, Snapshot
from tests import factories as f
from tests.integration.support import (
    WorkerProcess,
    make_ctx,
    node_composition,
    pg_status,
    redis_status,
    wait_for,
)
from tests.servers import Database, RedisServer
from workers.cleanup import Cleaner, CleanupFailed
from workers.context import WorkerContext
from workers.drain import drain
from workers.reconcile import reconcile_once

StartWorker = Callable[[WorkerContext], WorkerProcess]
RUN = Owner(f.TENANT, f.RUN)
REQUEST = CreateRunRequest(composition=node_composition())


def key_of(scope: Scope) -> SessionKey:
    assert scope.key is not None
    return scope.key


def finish(
    lc: SessionLifecycle, scope: Scope, state: object, *, entry: Entry | None = None
) -> NodeResult:
    """One node entry that succeeds with a snapshot holding ``state`` (no backend involved)."""
    entry = lc.enter(scope) if entry is None else entry
    outcome = RunOutcome("succeeded", f"backend-{state}", REQUEST, f.snapshot(state={"s": state}))
    return lc.finish(scope, entry, outcome)


def refused_as_ended(result: NodeResult) -> bool:
    detail = str(result.metadata.get("session_store_error_detail", ""))
    return result.metadata.get("session_snapshot_persisted") is False and "ended" in detail


def flushed(ctx: WorkerContext) -> None:
    report = drain(ctx, timeout_s=30)
    assert report.drained, report


def clean_locally(ctx: WorkerContext, key: SessionKey) -> None:
    assert Cleaner(ctx.cache, ctx.repo, None, 1).clean(key, last_attempt=True).outcome in (
        "cleaned_locally",
        "skipped",
    )


def snapshot_state(snapshot: Snapshot) -> object:
    return snapshot.decoded().layers[0].runtime_state.get("s")


@pytest.fixture
def ctx(redis_client: redis.Redis, redis_url: str, migrated: Database) -> WorkerContext:
    return make_ctx(redis_url, migrated.url)


@pytest.fixture
def lc(ctx: WorkerContext) -> SessionLifecycle:
    return SessionLifecycle(ctx)


# ------------------------------------------------------------------ 1. the end is durable


def test_ended_run_markers_are_not_evictable_so_late_saves_stay_refused(
    migrated: Database,
) -> None:
    """Under ``volatile-lru`` with memory full, every ended run still refuses a late save."""
    with RedisServer(["--maxmemory", "6mb", "--maxmemory-policy", "volatile-lru"]) as server:
        ctx = make_ctx(server.url, migrated.url)
        lc = SessionLifecycle(ctx)
        scopes = [f.scope(run=f"run-{i}") for i in range(20)]
        for scope in scopes:
            finish(lc, scope, 1)
            assert scope.workflow_run_id is not None
            lc.workflow_ended(f.TENANT, scope.workflow_run_id, "succeeded")
        flushed(ctx)
        with server.client() as client:
            for i in range(3000):  # volatile keys push everything with a TTL out
                with contextlib.suppress(redis.exceptions.OutOfMemoryError):
                    client.set(f"filler:{i}", b"x" * 10_000, ex=3600)
            assert client.info("stats")["evicted_keys"] > 0
        for scope in scopes:
            assert refused_as_ended(finish(lc, scope, 2))
            assert not lc.enter(scope).resumable


def test_after_redis_lost_everything_an_ended_run_stays_ended(
    ctx: WorkerContext, lc: SessionLifecycle, redis_client: redis.Redis
) -> None:
    """A restart without persistence forgets the end; Postgres remembers it: a late save is
    refused, nothing is resumable, and Postgres never goes back to ``active``."""
    scope = f.scope()
    for i in range(3):
        finish(lc, scope, i)
    lc.workflow_ended(f.TENANT, f.RUN, "succeeded")
    clean_locally(ctx, key_of(scope))
    flushed(ctx)
    assert pg_status(ctx, key_of(scope)) is SessionStatus.CLEANED
    redis_client.flushall()  # Redis lost its data (no AOF)
    redis_client.script_flush()
    entry = lc.enter(scope)
    assert not entry.resumable
    assert refused_as_ended(finish(lc, scope, "late", entry=entry))
    redis_client.flushall()  # lost again, right before a save that expects no session at all
    assert refused_as_ended(finish(lc, scope, "later", entry=Entry(version=0)))
    assert not lc.enter(scope).resumable
    flushed(ctx)
    assert pg_status(ctx, key_of(scope)) is SessionStatus.CLEANED


def test_read_through_of_a_session_of_an_ended_run_is_not_resumable(
    ctx: WorkerContext, lc: SessionLifecycle
) -> None:
    """A Redis miss in an ended run reads Postgres (still ``active`` there: the end's clean-up
    never ran) and returns a fresh entry, never the row's snapshot."""
    scope = f.scope()
    finish(lc, scope, 1)
    flushed(ctx)
    ctx.cache.end_owner(RUN, "aborted")  # the end, and then a crash before begin_cleanup
    ctx.cache.client.delete(ctx.cache.keys.session(key_of(scope)))  # evicted (clean: TTL)
    assert pg_status(ctx, key_of(scope)) is SessionStatus.ACTIVE
    assert not lc.enter(scope).resumable


# ------------------------------------------------------------------ 2. lineage


def test_equal_versions_of_two_lineages_are_quarantined_never_acknowledged(
    ctx: WorkerContext,
) -> None:
    """save x3, flush, Redis loses the key, save x3 on a fresh lineage, flush: the fence must
    not take "stored 3 == offered 3" for an applied retry."""
    key = f.session_key()
    for i in range(3):
        ctx.cache.save(key, f.session_write(f.snapshot(state={"branch": "a", "i": i})))
    flushed(ctx)
    ctx.cache.client.delete(ctx.cache.keys.session(key))
    for i in range(3):
        ctx.cache.save(key, f.session_write(f.snapshot(state={"branch": "b", "i": i})))
    flushed(ctx)
    shard, name = ctx.cache.keys.shard_of_key(key), ctx.cache.keys.session(key)
    assert "lineage" in ctx.cache.poison(shard)[name]
    row = ctx.repo.get(key)
    assert row is not None and row.snapshot.layers[0].runtime_state["branch"] == "a"
    record = ctx.cache.load(key).record
    assert record is not None and record.dirty  # never marked clean


def test_a_save_whose_hash_vanished_reads_through_and_lands(
    ctx: WorkerContext, lc: SessionLifecycle
) -> None:
    """enter reads v3, the clean hash expires, finish saves expecting 3: the save reads
    Postgres back, finds 3 and lands as v4 instead of dropping the new snapshot."""
    scope = f.scope()
    for i in range(3):
        finish(lc, scope, i)
    flushed(ctx)
    entry = lc.enter(scope)
    assert entry.version == 3
    ctx.cache.client.delete(ctx.cache.keys.session(key_of(scope)))  # expired meanwhile
    result = finish(lc, scope, "new", entry=entry)
    assert result.version == 4 and not result.conflict
    resumed = lc.enter(scope)
    assert resumed.snapshot is not None and snapshot_state(resumed.snapshot) == "new"
    flushed(ctx)
    row = ctx.repo.get(key_of(scope))
    assert row is not None and row.version == 4


def test_a_save_whose_hash_vanished_still_reports_a_real_conflict(
    ctx: WorkerContext, lc: SessionLifecycle
) -> None:
    scope = f.scope()
    for i in range(3):
        finish(lc, scope, i)
    flushed(ctx)
    stale = lc.enter(scope)
    finish(lc, scope, "other entry")  # v4 by another entry, flushed, then the hash vanishes
    flushed(ctx)
    ctx.cache.client.delete(ctx.cache.keys.session(key_of(scope)))
    result = finish(lc, scope, "late", entry=stale)
    assert result.conflict and result.metadata["session_snapshot_persisted"] is False


# ------------------------------------------------------------------ 3. the fence


def test_postgres_never_turns_a_session_closed_by_the_workflow_end_back_to_active(
    ctx: WorkerContext, lc: SessionLifecycle, migrated: Database
) -> None:
    scope = f.scope()
    finish(lc, scope, 1)
    lc.workflow_ended(f.TENANT, f.RUN, "succeeded")
    flushed(ctx)
    assert pg_status(ctx, key_of(scope)) is SessionStatus.CLEANING
    # Redis forgets the end and takes a save it should have refused (a failover, say)
    ctx.cache.client.delete(ctx.cache.keys.owner(RUN))
    ctx.cache.save(key_of(scope), f.session_write(), expected_version=None)
    flushed(ctx)
    assert pg_status(ctx, key_of(scope)) is not SessionStatus.ACTIVE
    with psycopg.connect(migrated.url) as conn:
        row = conn.execute("SELECT status, closed_by FROM agent_runtime_sessions").fetchone()
    assert row is not None and row[1] == "workflow_end"


# ------------------------------------------------------------------ 4. every ended run cleaned


def test_a_crash_between_the_end_and_the_cleanup_is_finished_by_the_reconciler(
    redis_client: redis.Redis, redis_url: str, migrated: Database, start_worker: StartWorker
) -> None:
    ctx = make_ctx(
        redis_url, migrated.url, flush_delay_ms=200, reconcile_grace_s=0, reconcile_interval_s=1
    )
    lc = SessionLifecycle(ctx)
    scopes = [f.scope(node=f"node-{i}") for i in range(3)]
    for scope in scopes:
        finish(lc, scope, 1)
    flushed(ctx)
    ctx.repo.record_end(RUN, "failed", check_after_s=0)  # what workflow_ended does first
    ctx.cache.end_owner(RUN, "failed")  # ... and then the process died
    keys = [key_of(scope) for scope in scopes]
    assert all(redis_status(ctx, key) is SessionStatus.ACTIVE for key in keys)
    start_worker(ctx)
    wait_for(
        lambda: all(
            redis_status(ctx, k) is SessionStatus.CLEANED
            and pg_status(ctx, k) is SessionStatus.CLEANED
            for k in keys
        ),
        "the reconciler to clean the ended run's sessions",
        60,
    )
    wait_for(lambda: getattr(ctx.repo.end_of(RUN), "settled", False), "the run settled", 30)


def test_a_run_that_keeps_failing_to_reconcile_does_not_hold_the_others(
    redis_client: redis.Redis, redis_url: str, migrated: Database
) -> None:
    ctx = make_ctx(redis_url, migrated.url, reconcile_grace_s=0, reconcile_interval_s=60)
    lc = SessionLifecycle(ctx)
    broken, healthy = Owner(f.TENANT, "run-broken"), Owner(f.TENANT, "run-healthy")
    for run in (broken, healthy):
        finish(lc, f.scope(run=run.owner_id), 1)
        ctx.repo.record_end(run, "succeeded", check_after_s=0)
    redis_client.sadd(ctx.cache.keys.owner_sessions(broken), "not:a:member%ZZ")  # unparseable
    done = reconcile_once(ctx)
    assert [r.sessions for r in done] == [1]  # the healthy run; the broken one was logged
    assert redis_status(ctx, key_of(f.scope(run=healthy.owner_id))) in (
        SessionStatus.CLEANING,
        SessionStatus.CLEANED,
    )


def test_workflow_ended_may_be_called_again_until_it_returns(
    ctx: WorkerContext, lc: SessionLifecycle
) -> None:
    scope = f.scope()
    finish(lc, scope, 1)
    first = lc.workflow_ended(f.TENANT, f.RUN, "succeeded")
    second = lc.workflow_ended(f.TENANT, f.RUN, "failed")
    assert not first.already_ended and second.already_ended
    assert second.sessions == 1 and second.moved_to_cleaning == 0
    end = ctx.repo.end_of(RUN)
    assert end is not None and end.outcome == "succeeded"


# ------------------------------------------------------------------ 5. deduplicating backends


def test_cleanup_retries_against_a_backend_that_dedupes_failed_runs(
    redis_client: redis.Redis, redis_url: str, migrated: Database
) -> None:
    """A backend may keep a failed run's idempotency key: a retry then GETs the remembered run
    and creates a new one under a derived key, instead of getting the failed run back."""
    with (
        FakeAgentBackend(dedupe_failed=True) as fake,
        AgentBackendClient(fake.url, timeout_s=5) as client,
    ):
        ctx = make_ctx(redis_url, migrated.url, agent_backend_url=fake.url)
        lc = SessionLifecycle(ctx)
        scope = f.scope()
        finish(lc, scope, 1)
        lc.workflow_ended(f.TENANT, f.RUN, "succeeded")
        fake.fail_next_cleanups(1, error="first attempt fails")
        cleaner = Cleaner(ctx.cache, ctx.repo, client, 5)
        with pytest.raises(CleanupFailed, match="first attempt fails"):
            cleaner.clean(key_of(scope), last_attempt=False)
        result = cleaner.clean(key_of(scope), last_attempt=False)
        assert result.outcome == "cleaned"
        runs = [run for run in fake.runs() if run.is_cleanup]
        assert [run.status for run in runs] == ["failed", "succeeded"]
        keys = [run.request.idempotency_key for run in runs]
        assert keys[0] != keys[1] and keys[1] is not None and keys[1].startswith(str(keys[0]))
        assert redis_status(ctx, key_of(scope)) is SessionStatus.CLEANED
