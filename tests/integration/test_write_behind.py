"""Write-behind end to end: real Redis, real Postgres, real RQ worker processes (DESIGN §5)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from rq.registry import FailedJobRegistry, ScheduledJobRegistry

from cache.errors import BacklogFull
from cache.records import SessionKey
from persistence.migrate import upgrade
from tests import factories as f
from tests.integration.support import (
    WorkerProcess,
    make_ctx,
    upsert,
    urgent_flush_queued,
    wait_for,
)
from tests.servers import Database, PostgresServer, fresh_database
from workers import jobs
from workers.context import WorkerContext
from workers.drain import dirty_total, drain
from workers.flush import FlushReport, flush_shard, flush_shards
from workers.flush_policy import MAX_BATCHES_PER_JOB
from workers.queues import FlushRequest, request_flush
from workers.readthrough import load_through

TABLE = "agent_runtime_sessions"


@pytest.fixture
def ctx(redis_client: object, redis_url: str, migrated: Database) -> WorkerContext:
    return make_ctx(redis_url, migrated.url)


def pg_row(db_url: str, key: SessionKey) -> tuple[object, ...] | None:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            f"SELECT version, status, snapshot FROM {TABLE} WHERE tenant_id=%s AND "
            "workflow_run_id=%s AND node_id=%s AND binding_id=%s AND agent_id=%s",
            key.parts(),
        ).fetchone()


def count_row_writes(db_url: str) -> Callable[[], int]:
    """Install a trigger that counts every row INSERT/UPDATE; return a reader."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE row_writes (n bigint NOT NULL)")
        conn.execute("INSERT INTO row_writes VALUES (0)")
        conn.execute(
            "CREATE FUNCTION count_write() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN UPDATE row_writes SET n = n + 1; RETURN NEW; END $$"
        )
        conn.execute(
            f"CREATE TRIGGER count_writes AFTER INSERT OR UPDATE ON {TABLE} "
            "FOR EACH ROW EXECUTE FUNCTION count_write()"
        )

    def read() -> int:
        with psycopg.connect(db_url) as conn:
            row = conn.execute("SELECT n FROM row_writes").fetchone()
            return int(row[0]) if row else 0

    return read


def nothing_dirty(ctx: WorkerContext) -> bool:
    return not dirty_total(ctx)


def test_saves_flow_to_postgres_with_latest_version_snapshot_and_specs(
    ctx: WorkerContext, start_worker: Callable[[WorkerContext], WorkerProcess]
) -> None:
    """Invariant: every save reaches Postgres, and the row holds the latest version."""
    keys = [f.session_key(run=f"run-{i}", node=f"n{i % 3}") for i in range(30)]
    final = {}
    for round_ in range(3):
        for key in keys:
            write = f.session_write(
                f.snapshot("history", state={"round": round_, "k": key.node_id})
            )
            final[key] = (ctx.cache.save(key, write), write)
    start_worker(ctx)
    wait_for(lambda: nothing_dirty(ctx), "the worker to flush everything")
    wait_for(lambda: ctx.cache.counters().get("rows_flushed") == len(keys), "the flush counter")
    assert FailedJobRegistry(queue=ctx.flush_queue).count == 0
    assert ScheduledJobRegistry(queue=ctx.flush_queue).count == 0  # no job is waiting to retry
    for key, (version, write) in final.items():
        row = ctx.repo.get(key)
        assert row is not None
        assert row.version == version == 3
        assert row.snapshot == write.snapshot
        assert row.layer_specs == write.layer_specs


def test_loop_of_1000_saves_to_one_session_costs_a_handful_of_postgres_writes(
    ctx: WorkerContext, migrated: Database, start_worker: Callable[[WorkerContext], WorkerProcess]
) -> None:
    """Invariant: saves coalesce; Postgres sees about one write per flush, not one per save."""
    writes = count_row_writes(migrated.url)
    start_worker(ctx)
    key = f.session_key()
    for i in range(1000):
        ctx.cache.save(key, f.session_write(f.snapshot(state={"i": i})))
    wait_for(lambda: nothing_dirty(ctx), "the loop's session to be flushed")
    row = ctx.repo.get(key)
    assert row is not None and row.version == 1000
    assert row.snapshot.layers[0].runtime_state == {"i": 999}
    assert 1 <= writes() <= 50, f"{writes()} Postgres writes for 1000 saves"


def test_replayed_older_flush_never_moves_a_row_backwards(ctx: WorkerContext) -> None:
    """Invariant: the version fence makes a late, duplicated or reordered flush harmless."""
    key = f.session_key()
    shard = ctx.cache.keys.shard_of_key(key)
    name = ctx.cache.keys.session(key)
    ctx.cache.save(key, f.session_write(f.snapshot(state={"v": 1})))
    old = ctx.cache.read_many([name])[0]
    for v in (2, 3):
        ctx.cache.save(key, f.session_write(f.snapshot(state={"v": v})))
    report = flush_shard(ctx.cache, ctx.repo, shard, delay_ms=0, limit=10)
    assert report.written == 1 and report.acked == 1
    assert not isinstance(old, Exception) and old is not None
    replay = upsert(ctx.repo, [old])
    assert replay.written == []
    row = ctx.repo.get(key)
    assert row is not None and row.version == 3
    assert row.snapshot.layers[0].runtime_state == {"v": 3}


def test_a_flush_waiting_for_the_shard_lock_blocks_until_its_release(ctx: WorkerContext) -> None:
    """A flush that may wait for a held lock blocks on the lock's free list (BLPOP, no polling)
    and takes the lock when the holder's release wakes it."""
    key = f.session_key()
    ctx.cache.save(key, f.session_write())
    shard = ctx.cache.keys.shard_of_key(key)
    assert ctx.cache.take_lock(shard, "holder", 30_000)
    reports: list[FlushReport] = []
    waiter = threading.Thread(
        target=lambda: reports.append(
            flush_shard(ctx.cache, ctx.repo, shard, delay_ms=0, limit=10, lock_wait_s=25)
        )
    )
    waiter.start()
    db = str(ctx.cache.client.connection_pool.connection_kwargs.get("db", 0))  # type: ignore[union-attr]
    blocked = lambda: any(  # noqa: E731
        c["cmd"] == "blpop" and c["db"] == db for c in ctx.cache.client.client_list()
    )
    wait_for(blocked, "the waiting flush to block on the lock's free list")
    assert ctx.repo.get(key) is None and waiter.is_alive()
    assert ctx.cache.release_lock(shard, "holder")
    waiter.join(timeout=20)
    assert not waiter.is_alive() and reports[0].locked and reports[0].acked == 1
    assert ctx.repo.get(key) is not None
    free = ctx.cache.keys.flush_lock_free(shard)
    assert 0 < int(ctx.cache.client.pttl(free)) <= 1000 or not ctx.cache.client.exists(free)  # type: ignore[arg-type]


def _dirty_in_shards(ctx: WorkerContext, per_shard: int) -> dict[int, list[SessionKey]]:
    """``per_shard`` dirty sessions in each shard of ``ctx``."""
    keys = {}
    for shard in range(ctx.settings.shards):
        found = f.keys_in_shard(ctx.cache.keys, shard)
        keys[shard] = [next(found) for _ in range(per_shard)]
        for key in keys[shard]:
            ctx.cache.save(key, f.session_write())
    return keys


def test_a_group_of_shards_is_flushed_in_rounds_no_larger_than_one_batch(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several shards share one statement, but a statement (and what a worker holds) never
    exceeds one batch: a shard cut short by the round's budget is reported full."""
    _dirty_in_shards(ctx, per_shard=2)
    statements: list[int] = []
    upsert_rows = ctx.repo.upsert_rows
    monkeypatch.setattr(
        ctx.repo,
        "upsert_rows",
        lambda rows, **kw: statements.append(len(rows)) or upsert_rows(rows, **kw),
    )
    reports = flush_shards(ctx.cache, ctx.repo, [0, 1, 2, 3], delay_ms=0, limit=3)
    assert statements == [3, 3]
    assert [(r.read, r.full) for r in reports] == [(2, False), (1, True), (2, False), (1, True)]
    assert all(r.locked and r.acked == r.read for r in reports)
    assert dirty_total(ctx) == [(1, 1), (3, 1)]
    rest = flush_shards(ctx.cache, ctx.repo, [1, 3], delay_ms=0, limit=3)
    assert [r.read for r in rest] == [1, 1] and not dirty_total(ctx)


def test_a_failure_while_taking_a_groups_locks_releases_those_taken(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dirty_in_shards(ctx, per_shard=1)
    begin_flush = ctx.cache.begin_flush

    def failing_on_shard_2(shard: int, *args: object, **kwargs: object) -> object:
        if shard == 2:
            raise ConnectionError("a primary fails over")
        return begin_flush(shard, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ctx.cache, "begin_flush", failing_on_shard_2)
    with pytest.raises(ConnectionError):
        flush_shards(ctx.cache, ctx.repo, [0, 1, 2, 3], delay_ms=0, limit=100)
    for shard in (0, 1):
        assert not ctx.cache.client.exists(ctx.cache.keys.flush_lock(shard))
    monkeypatch.undo()
    assert all(r.locked for r in flush_shards(ctx.cache, ctx.repo, [0, 1], delay_ms=0, limit=9))


def test_the_lock_heartbeat_never_takes_back_a_lock_the_acknowledgement_released(
    redis_url: str, migrated: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal racing the acknowledgement would take the lock again for a flush that is
    over: the renewal waits for the acknowledgement, then sees the lock released."""
    ctx = make_ctx(redis_url, migrated.url, flush_lock_ttl_s=0.2)
    key = f.session_key()
    ctx.cache.save(key, f.session_write())
    shard = ctx.cache.keys.shard_of_key(key)
    ack_flush = ctx.cache.ack_flush

    def slow_after_the_release(*args: object, **kwargs: object) -> object:
        acked = ack_flush(*args, **kwargs)  # type: ignore[arg-type]
        time.sleep(0.3)  # more than a heartbeat's period (ttl / 4)
        return acked

    monkeypatch.setattr(ctx.cache, "ack_flush", slow_after_the_release)
    report = flush_shard(ctx.cache, ctx.repo, shard, delay_ms=0, limit=10)
    assert report.acked == 1
    assert not ctx.cache.client.exists(ctx.cache.keys.flush_lock(shard))


def test_sigkill_during_a_flush_loses_nothing(
    ctx: WorkerContext, migrated: Database, start_worker: Callable[[WorkerContext], WorkerProcess]
) -> None:
    """Invariant: a worker killed mid-flush acknowledged nothing; a later flush writes it all."""
    keys = [f.session_key(run=f"run-{i}") for i in range(40)]
    for key in keys:
        ctx.cache.save(key, f.session_write())
    blocker = psycopg.connect(migrated.url)
    blocker.execute(f"LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE")  # the flush will hang here
    worker = start_worker(ctx)
    locks = [ctx.cache.keys.flush_lock(s) for s in range(ctx.settings.shards)]
    wait_for(lambda: any(ctx.cache.client.exists(k) for k in locks), "a flush to be in progress")
    worker.kill()
    blocker.rollback()
    blocker.close()
    assert sum(count for _, count in dirty_total(ctx)) == len(keys)
    report = drain(ctx, timeout_s=60)
    # The killed worker's statement may still commit server-side once the lock is gone;
    # the fence then reports those rows as already applied and they are acknowledged.
    assert report.drained and report.poisoned == 0
    for key in keys:
        row = ctx.repo.get(key)
        assert row is not None and row.version == 1


def test_postgres_outage_grows_the_backlog_then_drains_it(
    redis_client: object,
    redis_url: str,
    private_postgres: PostgresServer,
    start_worker: Callable[[WorkerContext], WorkerProcess],
) -> None:
    """Invariant: saves go on while Postgres is down; the backlog drains when it returns."""
    with fresh_database(private_postgres.url) as db:
        upgrade(db.url)
        ctx = make_ctx(redis_url, db.url)
        start_worker(ctx)
        private_postgres.stop()
        keys = [f.session_key(run=f"run-{i}") for i in range(50)]
        backlog = []
        for round_ in range(4):
            for key in keys:
                ctx.cache.save(key, f.session_write(f.snapshot(state={"round": round_})))
            backlog.append(sum(c for _, c in dirty_total(ctx)))
        assert backlog[-1] == len(keys)
        private_postgres.start()
        wait_for(lambda: nothing_dirty(ctx), "the backlog to drain after Postgres returned", 120)
        for key in keys:
            row = ctx.repo.get(key)
            assert row is not None and row.version == 4
            assert row.snapshot.layers[0].runtime_state == {"round": 3}
        ctx.close()


def test_a_row_postgres_refuses_is_parked_in_poison_and_the_rest_land(
    redis_client: object, redis_url: str, migrated: Database
) -> None:
    """Invariant: a poison row never blocks its batch; it is reported with the reason."""
    ctx = make_ctx(redis_url, migrated.url, shards=1)
    good = [f.session_key(run=f"run-{i}") for i in range(10)]
    bad = f.session_key(run="run-poison", node="node-refused")
    with psycopg.connect(migrated.url, autocommit=True) as conn:  # a constraint added later
        conn.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT refuse CHECK (node_id <> 'node-refused')")
    for key in good:
        ctx.cache.save(key, f.session_write())
    ctx.cache.save(bad, f.session_write())
    report = flush_shard(ctx.cache, ctx.repo, 0, delay_ms=0, limit=100)
    assert report.written == len(good)
    assert report.poisoned == [ctx.cache.keys.session(bad)]
    assert all(ctx.repo.get(key) is not None for key in good)
    assert ctx.repo.get(bad) is None
    poison = ctx.cache.poison(0)
    assert "postgres refused" in poison[ctx.cache.keys.session(bad)]
    assert nothing_dirty(ctx)
    with psycopg.connect(migrated.url, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {TABLE} DROP CONSTRAINT refuse")
    ctx.cache.save(bad, f.session_write())  # fixed by the next save: flushed, poison cleared
    drain(ctx, timeout_s=30)
    assert ctx.repo.get(bad) is not None and ctx.cache.poison(0) == {}


def test_backlog_bound_refuses_saves_when_postgres_cannot_keep_up(
    redis_client: object, redis_url: str, migrated: Database
) -> None:
    """Invariant: the dirty backlog is bounded; a full shard refuses new sessions, writes none."""
    ctx = make_ctx(redis_url, migrated.url, shards=1, max_dirty_per_shard=5)
    keys = [f.session_key(run=f"run-{i}") for i in range(6)]
    for key in keys[:5]:
        ctx.cache.save(key, f.session_write())
    with pytest.raises(BacklogFull):
        ctx.cache.save(keys[5], f.session_write())
    assert ctx.cache.load(keys[5]).record is None
    ctx.cache.save(keys[0], f.session_write())  # an already-dirty session may still move on
    drain(ctx, timeout_s=30)
    assert ctx.cache.save(keys[5], f.session_write()) == 1


def test_read_through_after_the_redis_key_is_gone_returns_what_postgres_holds(
    ctx: WorkerContext,
) -> None:
    """Invariant: a miss reads Postgres and fills Redis with the row's version (no restart)."""
    key = f.session_key()
    for i in range(3):
        ctx.cache.save(key, f.session_write(f.snapshot(state={"i": i})))
    drain(ctx, timeout_s=30)
    ctx.cache.client.delete(ctx.cache.keys.session(key))
    loaded = load_through(ctx.cache, ctx.repo, key)
    assert loaded.record == ctx.repo.get(key)
    assert loaded.version == 3 and loaded.session is not None
    assert ctx.cache.load(key).version == 3
    assert ctx.cache.save(key, f.session_write(), expected_version=3) == 4
    drain(ctx, timeout_s=30)
    assert ctx.cache.poison(ctx.cache.keys.shard_of_key(key)) == {}
    row = ctx.repo.get(key)
    assert row is not None and row.version == 4


def test_recreating_a_key_without_fill_is_reported_not_acknowledged(ctx: WorkerContext) -> None:
    """Invariant: a key re-created without a fill (a new lineage, behind Postgres) is parked in
    poison, never acknowledged."""
    key = f.session_key()
    for _ in range(3):
        ctx.cache.save(key, f.session_write())
    drain(ctx, timeout_s=30)
    ctx.cache.client.delete(ctx.cache.keys.session(key))
    ctx.cache.save(key, f.session_write())  # version 1 again, behind Postgres's 3
    drain(ctx, timeout_s=30)
    reason = ctx.cache.poison(ctx.cache.keys.shard_of_key(key))[ctx.cache.keys.session(key)]
    assert "diverged lineage" in reason and "at version 3" in reason
    row = ctx.repo.get(key)
    assert row is not None and row.version == 3


def test_urgent_flush_job_ignores_the_flush_delay(
    redis_client: object,
    redis_url: str,
    migrated: Database,
    start_worker: Callable[[WorkerContext], WorkerProcess],
) -> None:
    """Invariant: an urgent flush (pause, retire, run end) lands without waiting the delay."""
    ctx = make_ctx(redis_url, migrated.url, flush_delay_ms=3_600_000)
    start_worker(ctx)
    key = f.session_key()
    ctx.cache.save(key, f.session_write())
    shard = ctx.cache.keys.shard_of_key(key)
    request = request_flush(ctx.flush_queue, "asc", shard, urgent=True, pending_ms=5000)
    assert request is FlushRequest.ENQUEUED
    wait_for(lambda: ctx.repo.get(key) is not None, "the urgent flush", 30)


def test_an_urgent_job_whose_budget_runs_out_asks_for_another(
    redis_client: object, redis_url: str, migrated: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause deeper in a backlog than one job's batches still gets flushed urgently."""
    ctx = make_ctx(redis_url, migrated.url, shards=1, flush_batch=1, flush_delay_ms=3_600_000)
    for i in range(MAX_BATCHES_PER_JOB + 3):
        ctx.cache.save(f.session_key(node=f"node-{i}"), f.session_write())
    monkeypatch.setattr(jobs, "current", lambda: ctx)
    done = jobs.flush_job(0, urgent=True)
    assert done["written"] == MAX_BATCHES_PER_JOB
    assert urgent_flush_queued(ctx, 0)
    ctx.flush_queue.empty()
    assert jobs.flush_job(0, urgent=True)["written"] == 3
    assert not urgent_flush_queued(ctx, 0)  # nothing left: no job asked for


def test_an_undecodable_session_is_parked_once_and_never_loops(ctx: WorkerContext) -> None:
    """A value that cannot be decoded leaves the dirty set for poison; drain terminates."""
    key = f.session_key()
    ctx.cache.save(key, f.session_write())
    name = ctx.cache.keys.session(key)
    ctx.cache.client.hset(name, "snapshot", b"\xc1 not msgpack")
    report = drain(ctx, timeout_s=10)
    assert report.drained and report.poisoned == 1
    shard = ctx.cache.keys.shard_of_key(key)
    assert "cannot decode" in ctx.cache.poison(shard)[name]
    assert ctx.cache.client.pttl(name) == -1  # kept, without TTL, for the operator


def test_a_lagging_copy_of_the_same_lineage_is_reported_postgres_ahead(ctx: WorkerContext) -> None:
    """Invariant: Redis holding an older version of the same history (a failover to a replica
    that lagged) is parked in poison as "postgres is ahead", never acknowledged."""
    key = f.session_key()
    for _ in range(5):
        ctx.cache.save(key, f.session_write())
    drain(ctx, timeout_s=30)
    name, shard = ctx.cache.keys.session(key), ctx.cache.keys.shard_of_key(key)
    ctx.cache.client.hset(name, mapping={"version": 3, "flushed_version": 2})  # the replica's
    ctx.cache.client.zadd(ctx.cache.keys.dirty(shard), {name: 0})
    drain(ctx, timeout_s=30)
    assert (
        "postgres is ahead of redis: stored version 5 > flushed 3" in ctx.cache.poison(shard)[name]
    )
    row = ctx.repo.get(key)
    assert row is not None and row.version == 5
