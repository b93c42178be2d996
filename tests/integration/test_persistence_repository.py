"""``SessionRepository`` against a real Postgres: the fence, rejection, outages, round trips."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cache.records import (
    ClosedBy,
    LayerSpec,
    LifecycleState,
    SessionKey,
    SessionStatus,
    Snapshot,
    SnapshotLayer,
    StoredSession,
)
from cache.snapshot_json import encode_checked
from persistence import migrate
from persistence.engine import create_engine
from persistence.errors import PersistenceUnavailable, RowRejected
from persistence.models import TABLE_NAME
from persistence.repository import SessionRepository
from persistence.rows import row_of_session
from persistence.upsert import UpsertResult
from tests import factories as f
from tests.factories import scope, session_key, session_write, snapshot, specs, stored_session
from tests.integration.support import row_count, rows_of, upsert
from tests.servers import Database, PostgresServer


@pytest.fixture
def engine(database_url: Database) -> Iterator[Engine]:
    migrate.upgrade(database_url.url)
    engine = create_engine(database_url.url)
    yield engine
    engine.dispose()


@pytest.fixture
def repo(engine: Engine) -> Iterator[SessionRepository]:
    repo = SessionRepository(engine, "asc")
    yield repo
    repo.close()


def session(
    key: SessionKey, version: int, *, note: str = "", status: SessionStatus = SessionStatus.ACTIVE
) -> StoredSession:
    """A session at ``version`` whose snapshot says which write it came from."""
    write = session_write(snapshot(state={"note": note or f"v{version}"}))
    return stored_session(key, version=version, flushed_version=0, status=status, write=write)


def flushed(s: StoredSession) -> StoredSession:
    """``s`` as Postgres hands it back: flushed at its own version."""
    return dataclasses.replace(s, flushed_version=s.version)


def raw_row(engine: Engine, key: SessionKey) -> dict[str, Any]:
    query = sa.text(
        f"SELECT * FROM {TABLE_NAME} WHERE tenant_id = :t AND workflow_run_id = :r "
        "AND node_id = :n AND binding_id = :b AND agent_id = :a"
    )
    with engine.connect() as conn:
        row = conn.execute(query, dict(zip("trnba", key.parts(), strict=True))).mappings().one()
    return dict(row)


def rich_session(key: SessionKey) -> StoredSession:
    """Every optional field set, non-ASCII text, several layers and specs, µs timestamps."""
    snap = Snapshot(
        layers=(
            SnapshotLayer("history", LifecycleState.SUSPENDED, {"messages": ["héllo 👋", 1.5]}),
            SnapshotLayer("memory", LifecycleState.NEW, {"nested": {"a": [None, True, 3]}}),
            SnapshotLayer("scratch", LifecycleState.CLOSED, {}),
        )
    )
    layer_specs = (
        *specs("history", "memory"),
        LayerSpec("scratch", "t.scratch", {}, {}, ["a", {"b": None}, 2]),
    )
    write = session_write(
        snap,
        layer_specs,
        of=scope(tenant=key.tenant_id, run=key.workflow_run_id, node=key.node_id),
        backend_run_id="backend-run-9",
        pending_form_id="form-1",
        pending_tool_call_id="call-1",
    )
    return StoredSession(
        key=key,
        status=SessionStatus.CLEANED,
        version=7,
        data=write,
        flushed_version=3,
        created_at="2024-01-01T00:00:00.000+00:00",
        updated_at="2024-01-02T03:04:05.123+00:00",
        cleaned_at="2024-01-02T03:04:05.123456+00:00",
        closed_by=ClosedBy.BACKEND_FAILURE,
        cleanup_error="backend said: nope",
    )


NOW = datetime(2026, 1, 1, tzinfo=UTC)


# ----------------------------------------------------------------------------- writes


def test_insert_then_update_mirrors_the_newer_session(repo: SessionRepository) -> None:
    key = session_key()
    first, second = session(key, 1), session(key, 2, status=SessionStatus.CLEANING)
    assert upsert(repo, [first]) == UpsertResult(written=[(key, 1)])
    assert upsert(repo, [second]) == UpsertResult(written=[(key, 2)])
    assert repo.get(key) == flushed(second)
    assert row_count(repo) == 1


def test_lower_version_never_changes_the_row_and_is_reported_ahead(
    repo: SessionRepository, engine: Engine
) -> None:
    key = session_key()
    upsert(repo, [session(key, 5)])
    before = raw_row(engine, key)
    result = upsert(repo, [session(key, 3, note="stale")])
    assert result.written == []
    assert result.fenced == result.ahead == [(key, 5, 3)]
    assert result.stale_equal == []
    assert raw_row(engine, key) == before  # snapshot, version and flushed_at untouched


def test_equal_version_never_changes_the_row_and_is_reported_stale_equal(
    repo: SessionRepository, engine: Engine
) -> None:
    key = session_key()
    upsert(repo, [session(key, 4)])
    before = raw_row(engine, key)
    result = upsert(repo, [session(key, 4, note="retried with other bytes")])
    assert result.written == []
    assert result.fenced == result.stale_equal == [(key, 4, 4)]
    assert result.ahead == []
    assert raw_row(engine, key) == before


def test_one_batch_writes_the_newer_rows_and_fences_the_others(repo: SessionRepository) -> None:
    newer, equal, behind, fresh = (session_key(node=f"node-{i}") for i in range(4))
    upsert(repo, [session(newer, 1), session(equal, 2), session(behind, 9)])
    result = upsert(
        repo, [session(fresh, 1), session(behind, 8), session(equal, 2), session(newer, 2)]
    )
    assert sorted(result.written, key=str) == sorted([(newer, 2), (fresh, 1)], key=str)
    assert result.stale_equal == [(equal, 2, 2)]
    assert result.ahead == [(behind, 9, 8)]
    assert repo.get(behind) == flushed(session(behind, 9))


def test_the_pooled_upsert_fences_alike_and_opens_no_thread_connection(
    repo: SessionRepository,
) -> None:
    """``direct=False`` (durable pauses from application threads): the same statement and
    fence on the engine's bounded pool, and no per-thread connection left behind."""
    newer, behind = session_key(node="newer"), session_key(node="behind")
    upsert(repo, [session(behind, 9)])
    made = len(repo._direct._made)
    rows = [row_of_session(session(k, v), NOW) for k, v in ((newer, 1), (behind, 8))]
    result = repo.upsert_rows(rows, direct=False)
    assert result.written == [(newer, 1)]
    assert result.ahead == [(behind, 9, 8)]
    assert repo.get(newer) == flushed(session(newer, 1))
    assert len(repo._direct._made) == made


def test_duplicate_keys_in_one_batch_collapse_to_the_highest_version(
    repo: SessionRepository,
) -> None:
    key, other = session_key(), session_key(node="node-2")
    batch = [session(key, 2), session(key, 5), session(other, 1), session(key, 3)]
    result = upsert(repo, batch)
    assert sorted(result.written, key=str) == sorted([(key, 5), (other, 1)], key=str)
    assert result.fenced == []
    assert repo.get(key) == flushed(session(key, 5))


def test_an_empty_batch_touches_nothing(repo: SessionRepository) -> None:
    assert upsert(repo, []) == UpsertResult()
    assert row_count(repo) == 0


def test_a_batch_larger_than_the_bind_parameter_limit_is_written(
    repo: SessionRepository,
) -> None:
    """4,000 rows x 21 columns would be 84,000 parameters as VALUES; the limit is 65,535."""
    batch = [session(session_key(node=f"node-{i}"), 1) for i in range(4000)]
    assert len(upsert(repo, batch).written) == 4000
    assert row_count(repo) == 4000


def test_stored_snapshot_is_the_codec_bytes_compressed_with_lz4(
    repo: SessionRepository, engine: Engine
) -> None:
    key = session_key()
    big = Snapshot(
        layers=(SnapshotLayer("history", LifecycleState.SUSPENDED, {"m": ["same words"] * 900}),)
    )
    upsert(repo, [stored_session(key, write=session_write(big))])
    row = raw_row(engine, key)
    assert row["snapshot"] == encode_checked(big, 1 << 20)
    with engine.connect() as conn:
        method = conn.execute(
            sa.text(f"SELECT pg_column_compression(snapshot) FROM {TABLE_NAME}")
        ).scalar_one()
    assert method == "lz4"


def test_flushed_at_is_set_by_the_server_on_every_write(
    repo: SessionRepository, engine: Engine
) -> None:
    key = session_key()
    upsert(repo, [session(key, 1)])
    first = raw_row(engine, key)["flushed_at"]
    upsert(repo, [session(key, 2)])
    assert raw_row(engine, key)["flushed_at"] > first


# ----------------------------------------------------------------------------- rejection


def test_a_row_postgres_refuses_rejects_the_whole_batch(
    repo: SessionRepository, engine: Engine
) -> None:
    good, existing = (session_key(node=f"node-{i}") for i in range(2))
    bad = f.bypassing_checks_key(node_id="node\x00")  # Postgres text refuses NUL
    upsert(repo, [session(existing, 1)])
    before = raw_row(engine, existing)
    batch = [session(good, 1), session(existing, 2), session(bad, 1)]
    with pytest.raises(RowRejected) as caught:
        upsert(repo, batch)
    assert isinstance(caught.value.__cause__, psycopg.DataError)
    assert row_count(repo) == 1
    assert repo.get(good) is None
    assert raw_row(engine, existing) == before


def test_nul_byte_in_a_text_column_is_rejected(repo: SessionRepository) -> None:
    with pytest.raises(RowRejected):
        upsert(repo, [session(f.bypassing_checks_key(node_id="node\x00"), 1)])
    assert row_count(repo) == 0


def test_a_rejected_batch_leaves_the_repository_usable(repo: SessionRepository) -> None:
    with pytest.raises(RowRejected):
        upsert(repo, [session(f.bypassing_checks_key(node_id="node\x00"), 1)])
    assert upsert(repo, [session(session_key(), 1)]).written == [(session_key(), 1)]


# ----------------------------------------------------------------------------- outages


def test_a_stopped_server_raises_persistence_unavailable(
    private_postgres: PostgresServer,
) -> None:
    migrate.upgrade(private_postgres.url)
    engine = create_engine(private_postgres.url)
    repo = SessionRepository(engine, "asc")
    key = session_key()
    upsert(repo, [session(key, 1)])  # leaves a pooled connection to go stale
    private_postgres.stop()
    try:
        with pytest.raises(PersistenceUnavailable):
            upsert(repo, [session(key, 2)])
        with pytest.raises(PersistenceUnavailable):
            repo.get(key)
        private_postgres.start()
        assert upsert(repo, [session(key, 2)]).written == [(key, 2)]
    finally:
        repo.close()


def test_an_unreachable_server_raises_persistence_unavailable_when_migrating(
    private_postgres: PostgresServer,
) -> None:
    private_postgres.stop()
    with pytest.raises(PersistenceUnavailable):
        migrate.upgrade(private_postgres.url)


# ----------------------------------------------------------------------------- reads


def test_get_round_trips_every_field_exactly(repo: SessionRepository) -> None:
    key = session_key()
    written = rich_session(key)
    upsert(repo, [written])
    assert repo.get(key) == flushed(written)


def test_get_of_a_missing_key_is_none(repo: SessionRepository) -> None:
    upsert(repo, [session(session_key(), 1)])
    assert repo.get(session_key(agent="agent-other")) is None


def test_list_run_returns_that_runs_sessions_in_key_order(repo: SessionRepository) -> None:
    mine = [session_key(node=f"node-{i}") for i in (2, 0, 1)]
    other_run = session_key(run="run-2")
    upsert(repo, [session(k, 1) for k in [*mine, other_run]])
    listed = rows_of(repo, "tenant-1", "run-1")
    assert listed == [flushed(session(k, 1)) for k in sorted(mine, key=SessionKey.parts)]


def test_list_run_filters_by_status(repo: SessionRepository) -> None:
    active, cleaning = session_key(node="a"), session_key(node="b")
    upsert(repo, [session(active, 1), session(cleaning, 2, status=SessionStatus.CLEANING)])
    assert [s.key for s in rows_of(repo, "tenant-1", "run-1", SessionStatus.CLEANING)] == [cleaning]
    assert [s.key for s in rows_of(repo, "tenant-1", "run-1", SessionStatus.ACTIVE)] == [active]
    assert rows_of(repo, "tenant-1", "run-1", SessionStatus.CLEANED) == []


def test_list_run_never_returns_another_tenants_sessions(repo: SessionRepository) -> None:
    theirs = session_key(tenant="tenant-2")
    upsert(repo, [session(theirs, 1)])
    assert rows_of(repo, "tenant-1", "run-1") == []
    assert repo.get(session_key()) is None
    assert [s.key for s in rows_of(repo, "tenant-2", "run-1")] == [theirs]


def test_create_engine_gives_plain_urls_the_psycopg_driver(database_url: Database) -> None:
    for url in (database_url.url, database_url.sqlalchemy_url):
        engine = create_engine(url)
        try:
            assert engine.url.drivername == "postgresql+psycopg"
        finally:
            engine.dispose()


# ----------------------------------------------------------------------------- operator helpers


def test_count_by_status_counts_rows_of_every_tenant(repo: SessionRepository) -> None:
    upsert(
        repo,
        [
            session(session_key(node="a"), 1),
            session(session_key(tenant="tenant-2"), 1),
            session(session_key(node="b"), 1, status=SessionStatus.CLEANING),
        ],
    )
    assert repo.count_by_status() == {"active": 2, "cleaning": 1}


def test_list_status_returns_the_oldest_updates_first_up_to_the_limit(
    repo: SessionRepository,
) -> None:
    def cleaning(node: str, updated: str) -> StoredSession:
        s = session(session_key(node=node), 1, status=SessionStatus.CLEANING)
        return dataclasses.replace(s, updated_at=updated)

    upsert(
        repo,
        [
            cleaning("new", "2024-03-01T00:00:00.000+00:00"),
            cleaning("old", "2024-01-01T00:00:00.000+00:00"),
            cleaning("mid", "2024-02-01T00:00:00.000+00:00"),
            session(session_key(node="active"), 1),
        ],
    )
    listed = repo.list_status(SessionStatus.CLEANING, limit=2)
    assert [s.key.node_id for s in listed] == ["old", "mid"]


def test_cleanup_failures_are_cleaned_sessions_that_kept_an_error(
    repo: SessionRepository,
) -> None:
    failed = dataclasses.replace(
        session(session_key(node="failed"), 3, status=SessionStatus.CLEANED),
        cleanup_error="backend unreachable after 5 attempts",
    )
    clean = session(session_key(node="clean"), 3, status=SessionStatus.CLEANED)
    upsert(repo, [failed, clean, session(session_key(node="active"), 1)])
    assert repo.cleanup_failures(limit=10) == [flushed(failed)]
