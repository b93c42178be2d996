"""Redis goes back in time (a restore from an older state, a failover to a replica that missed
writes): nothing acknowledged is silently overwritten, nothing built on the older state is
written over what Postgres holds, and no owner Postgres records as ended is resumed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from agent_backend.models import CreateRunRequest
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.outcomes import RunOutcome
from cache.records import SessionKey, SessionStatus
from tests import factories as f
from tests.integration.support import (
    make_ctx,
    node_composition,
    row,
    stored,
    wait_for,
)
from tests.integration.tcp_proxy import TcpProxy
from tests.servers import Database, RedisServer, free_port
from workers.context import WorkerContext
from workers.drain import DrainReport, drain

REQUEST = CreateRunRequest(composition=node_composition())


def saved(ctx: WorkerContext, key: SessionKey, content: str, expected: int) -> int:
    write = f.session_write(f.snapshot(state={"content": content}))
    return ctx.cache.save(key, write, expected_version=expected)


def flushed(ctx: WorkerContext) -> DrainReport:
    report = drain(ctx, timeout_s=30)
    assert report.drained
    return report


def content_of(ctx: WorkerContext, key: SessionKey) -> object:
    return row(ctx, key).snapshot.layers[0].runtime_state["content"]


def poison_reason(ctx: WorkerContext, key: SessionKey) -> str:
    shard = ctx.cache.keys.shard_of_key(key)
    return ctx.cache.poison(shard).get(ctx.cache.keys.session(key), "")


@pytest.fixture
def ctx(redis_client: redis.Redis, redis_url: str, migrated: Database) -> WorkerContext:
    return make_ctx(redis_url, migrated.url)


def test_a_save_restored_over_reuses_no_version_postgres_holds_silently(
    ctx: WorkerContext, redis_client: redis.Redis
) -> None:
    """Before: A flushed, DUMP, B flushed (Postgres v2 = B), RESTORE, C saved as v2: the
    flush said ``written=0 poisoned=0`` and marked C clean, so the acknowledged C was lost
    once Redis let it go. Now C is parked with both sides named; Postgres keeps B."""
    key = f.session_key()
    name = ctx.cache.keys.session(key)
    assert saved(ctx, key, "A", 0) == 1
    flushed(ctx)
    dump = redis_client.dump(name)
    assert saved(ctx, key, "B", 1) == 2
    flushed(ctx)
    redis_client.restore(name, 0, dump, replace=True)
    assert saved(ctx, key, "C", 1) == 2
    report = flushed(ctx)
    assert report.written == 0 and report.parked == 1
    assert content_of(ctx, key) == "B" and row(ctx, key).version == 2
    reason = poison_reason(ctx, key)
    assert "same version, other content: postgres holds version 2" in reason
    assert str(stored(ctx, key).content_id) in reason and str(row(ctx, key).content_id) in reason
    assert stored(ctx, key).dirty, "C must not be taken for flushed"


def test_saves_past_postgres_on_an_older_state_are_never_written_over_it(
    ctx: WorkerContext, redis_client: redis.Redis
) -> None:
    """Before: Postgres at v4, Redis restored to v1 (same lineage), saves v2..v7 acknowledged,
    then v7 (built on v1) replaced v4 in Postgres. Now v7 is parked, v4 stays."""
    key = f.session_key()
    name = ctx.cache.keys.session(key)
    saved(ctx, key, "v1", 0)
    flushed(ctx)
    dump = redis_client.dump(name)
    for version in range(1, 4):
        saved(ctx, key, f"v{version + 1}", version)
        flushed(ctx)
    assert row(ctx, key).version == 4
    redis_client.restore(name, 0, dump, replace=True)
    for version in range(1, 7):
        saved(ctx, key, f"again v{version + 1}", version)
    report = flushed(ctx)
    assert report.written == 0 and report.parked == 1
    assert row(ctx, key).version == 4 and content_of(ctx, key) == "v4"
    assert "knows only up to version 1 reached postgres; it holds version 7" in poison_reason(
        ctx, key
    )


def test_a_lost_acknowledgement_is_not_taken_for_redis_going_back(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush that wrote Postgres and died before its acknowledgement leaves Postgres ahead
    of ``flushed_version``: the next flush finds the version in flight it noted and writes on."""
    key = f.session_key()
    saved(ctx, key, "A", 0)
    flushed(ctx)
    saved(ctx, key, "B", 1)

    def lost(*args: object, **kwargs: object) -> object:
        raise ConnectionError("killed before the acknowledgement")

    with monkeypatch.context() as patch:
        patch.setattr(ctx.cache, "ack_flush", lost)
        with pytest.raises(ConnectionError):
            drain(ctx, timeout_s=5, threads=1)
    assert row(ctx, key).version == 2 and stored(ctx, key).flushed_version == 1
    saved(ctx, key, "C", 2)
    report = flushed(ctx)
    assert report.parked == 0 and row(ctx, key).version == 3 and content_of(ctx, key) == "C"


def test_without_versions_in_flight_the_content_id_still_tells_two_saves_apart(
    ctx: WorkerContext, redis_client: redis.Redis
) -> None:
    """A hash an earlier build saved has no ``flushing_version``: the fence cannot tell what
    it knows, but Postgres's v2 and this copy's v2 are two different saves all the same."""
    key = f.session_key()
    name = ctx.cache.keys.session(key)
    saved(ctx, key, "A", 0)
    flushed(ctx)
    dump = redis_client.dump(name)
    saved(ctx, key, "B", 1)
    flushed(ctx)
    redis_client.restore(name, 0, dump, replace=True)
    redis_client.hdel(name, "flushing_version")
    saved(ctx, key, "C", 1)
    report = flushed(ctx)
    assert report.parked == 1 and content_of(ctx, key) == "B"
    assert "same version, other content: postgres holds version 2" in poison_reason(ctx, key)


def test_keep_redis_takes_the_parked_copy_over_postgres(
    ctx: WorkerContext, redis_client: redis.Redis
) -> None:
    """The operator decides: ``poison retry --keep-redis`` writes this copy over Postgres's."""
    key = f.session_key()
    name = ctx.cache.keys.session(key)
    saved(ctx, key, "A", 0)
    flushed(ctx)
    dump = redis_client.dump(name)
    saved(ctx, key, "B", 1)
    flushed(ctx)
    redis_client.restore(name, 0, dump, replace=True)
    saved(ctx, key, "C", 1)
    assert flushed(ctx).parked == 1
    assert ctx.cache.retry_poisoned(name, keep_redis=True, postgres_version=2)
    report = flushed(ctx)
    assert report.parked == 0 and content_of(ctx, key) == "C" and row(ctx, key).version == 3


# ------------------------------------------------------------------ a real replica promotion


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[RedisServer, RedisServer, int]]:
    """Two private servers on TCP ports: a primary and its replica."""
    ports = free_port(), free_port()
    servers = [RedisServer(["--port", str(port)]) for port in ports]
    try:
        primary, replica = servers
        with replica.client() as client:
            client.replicaof("127.0.0.1", ports[0])
        yield primary, replica, ports[0]
    finally:
        for server in servers:
            server.close()


def in_sync(primary: RedisServer, replica: RedisServer) -> bool:
    with primary.client() as p, replica.client() as r:
        return bool(
            r.info("replication").get("master_link_status") == "up"
            and p.info("replication")["master_repl_offset"]
            == r.info("replication")["slave_repl_offset"]
        )


def test_after_a_failover_to_a_replica_that_missed_the_end_nothing_of_the_run_resumes(
    primary_and_replica: tuple[RedisServer, RedisServer, int], migrated: Database
) -> None:
    """The replica is promoted (``REPLICAOF NO ONE``) before the primary saw more saves and
    the run's end; clients then reach it at the same address. Before, its ``open`` marker let
    the next entry resume the old snapshot and save into the ended run; and a flush of saves
    built on its older state went over what Postgres held."""
    primary, replica, primary_port = primary_and_replica
    with TcpProxy(("127.0.0.1", primary_port)) as proxy:
        ctx = make_ctx(proxy.url, migrated.url)
        lc = SessionLifecycle(ctx)
        scope = f.scope()
        key = scope.key
        assert key is not None
        first = lc.finish(scope, lc.enter(scope), outcome("A"))
        assert first.metadata["session_snapshot_persisted"] is True
        flushed(ctx)
        wait_for(lambda: in_sync(primary, replica), "the replica to catch up", 20)
        with replica.client() as client:
            client.replicaof("NO", "ONE")  # promoted; it misses everything from here on
        later = lc.finish(scope, lc.enter(scope), outcome("B"))
        assert later.version == 2
        flushed(ctx)
        lc.workflow_ended(f.TENANT, f.RUN, "succeeded")
        flushed(ctx)
        proxy.retarget(replica_address(replica))  # the failover: same address, another server
        time.sleep(0.1)
        entry = lc.enter(scope)
        assert not entry.resumable, "a session of a run Postgres records as ended resumed"
        assert stored(ctx, key).status is SessionStatus.CLEANING
        late = lc.finish(scope, entry, outcome("C"))
        assert late.metadata["session_snapshot_persisted"] is False
        assert row(ctx, key).version >= 2 and content_of(ctx, key) == "B"


def test_after_a_failover_saves_on_the_older_state_are_parked_not_written(
    primary_and_replica: tuple[RedisServer, RedisServer, int], migrated: Database
) -> None:
    primary, replica, primary_port = primary_and_replica
    with TcpProxy(("127.0.0.1", primary_port)) as proxy:
        ctx = make_ctx(proxy.url, migrated.url)
        key = f.session_key()
        saved(ctx, key, "A", 0)
        flushed(ctx)
        wait_for(lambda: in_sync(primary, replica), "the replica to catch up", 20)
        with replica.client() as client:
            client.replicaof("NO", "ONE")
        for version in range(1, 4):
            saved(ctx, key, f"v{version + 1}", version)
        flushed(ctx)
        proxy.retarget(replica_address(replica))
        time.sleep(0.1)
        assert ctx.cache.load(key).version == 1  # a read reconnects; a write is never resent
        assert saved(ctx, key, "on the replica", 1) == 2
        report = flushed(ctx)
        assert report.parked == 1 and row(ctx, key).version == 4
        assert "postgres is ahead of redis: stored version 4 > flushed 2" in poison_reason(ctx, key)


def replica_address(replica: RedisServer) -> tuple[str, int]:
    port = int(replica.extra_args[replica.extra_args.index("--port") + 1])
    return ("127.0.0.1", port)


def outcome(content: str) -> RunOutcome:
    snapshot = f.snapshot(state={"content": content})
    return RunOutcome("succeeded", f"backend-{content}", REQUEST, snapshot)
