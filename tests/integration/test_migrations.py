"""The Alembic migrations build exactly the schema ``persistence.models`` declares (DESIGN §8).

Alembic's autogenerate comparison covers tables, columns, types, nullability, server
defaults, unique constraints and indexes; it does not see CHECK constraints or TOAST
compression, so those two are compared with catalog queries.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection, Engine

from cache.codec import encode
from cache.records import Owner, SessionKey, SessionWrite, StoredSession
from persistence import migrate
from persistence.engine import create_engine
from persistence.models import TABLE_NAME, metadata, owners, sessions
from persistence.repository import SessionRepository
from tests import factories as f
from tests.integration.support import upsert
from tests.servers import Database

HEAD = "0006"
PARTIAL_BY_OWNER = (
    "agent_runtime_session_workflow_scope_unique",
    "agent_runtime_session_workflow_lookup_idx",
    "agent_runtime_session_conversation_scope_unique",
    "agent_runtime_session_conversation_lookup_idx",
)


@pytest.fixture
def engine(database_url: Database) -> Iterator[Engine]:
    engine = create_engine(database_url.url)
    yield engine
    engine.dispose()


def schema_diff(conn: Connection, target: sa.MetaData = metadata) -> list[Any]:
    context = MigrationContext.configure(
        conn, opts={"compare_type": True, "compare_server_default": True}
    )
    return list(compare_metadata(context, target))


def check_constraints(conn: Connection) -> dict[str, str]:
    rows = conn.execute(
        sa.text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = CAST(:table AS regclass) AND contype = 'c'"
        ),
        {"table": TABLE_NAME},
    )
    return {name: definition for name, definition in rows}


def column_compression(conn: Connection) -> dict[str, str]:
    """Column name -> attcompression ('' = the server default, 'p' pglz, 'l' lz4)."""
    rows = conn.execute(
        sa.text(
            "SELECT attname, attcompression FROM pg_attribute "
            "WHERE attrelid = CAST(:table AS regclass) AND attnum > 0 AND NOT attisdropped"
        ),
        {"table": TABLE_NAME},
    )
    return {name: compression for name, compression in rows}


def table_exists(conn: Connection) -> bool:
    return sa.inspect(conn).has_table(TABLE_NAME)


def test_migrated_schema_equals_the_models(database_url: Database, engine: Engine) -> None:
    migrate.upgrade(database_url.url)
    with engine.connect() as conn:
        assert schema_diff(conn) == []


def test_migrated_check_constraints_equal_the_models(
    database_url: Database, engine: Engine
) -> None:
    migrate.upgrade(database_url.url)
    with engine.connect() as conn:
        stored = check_constraints(conn)
    declared = {c.name for c in sessions.constraints if isinstance(c, sa.CheckConstraint)}
    assert set(stored) == declared
    assert stored["ck_agent_runtime_sessions_status"] == (
        "CHECK (((status)::text = ANY ((ARRAY['active'::character varying, "
        "'cleaning'::character varying, 'cleaned'::character varying])::text[])))"
    )


def test_migrated_constraint_and_index_names_equal_the_models(
    database_url: Database, engine: Engine
) -> None:
    migrate.upgrade(database_url.url)
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        stored = {
            "pk": inspector.get_pk_constraint(TABLE_NAME)["name"],
            "unique": {u["name"] for u in inspector.get_unique_constraints(TABLE_NAME)},
            "index": {
                i["name"]
                for i in inspector.get_indexes(TABLE_NAME)
                if not i.get("duplicates_constraint")
            },
        }
    assert stored == {
        "pk": sessions.primary_key.name,
        "unique": {c.name for c in sessions.constraints if isinstance(c, sa.UniqueConstraint)},
        "index": {i.name for i in sessions.indexes},
    }
    assert stored["unique"] == set()  # each owner's key is a partial unique index


def test_each_owners_key_and_lookup_are_partial_indexes_of_its_rows(
    database_url: Database, engine: Engine
) -> None:
    """Alembic's comparison does not see index predicates: the catalog is read instead."""
    migrate.upgrade(database_url.url)
    with engine.connect() as conn:
        found = {
            index["name"]: (index["unique"], index["dialect_options"].get("postgresql_where"))
            for index in sa.inspect(conn).get_indexes(TABLE_NAME)
        }
    workflow, conversation = "(workflow_run_id IS NOT NULL)", "(conversation_id IS NOT NULL)"
    assert {name: found[name] for name in PARTIAL_BY_OWNER} == {
        "agent_runtime_session_workflow_scope_unique": (True, workflow),
        "agent_runtime_session_workflow_lookup_idx": (False, workflow),
        "agent_runtime_session_conversation_scope_unique": (True, conversation),
        "agent_runtime_session_conversation_lookup_idx": (False, conversation),
    }
    declared = {
        index.name: (bool(index.unique), f"({index.dialect_options['postgresql']['where']})")
        for index in sessions.indexes
        if index.name in PARTIAL_BY_OWNER
    }
    assert declared == {name: found[name] for name in PARTIAL_BY_OWNER}


def test_upgrading_0005_keeps_every_row_and_each_key_unique_per_owner(
    database_url: Database, engine: Engine
) -> None:
    """0006 turns the unique constraints into partial unique indexes: rows written under
    0005 stay, the fenced upsert still finds them by key, and a second row of a key is
    still refused; downgrading brings the constraints back."""
    migrate.upgrade(database_url.url, "0005")
    key, conversation = f.session_key(), SessionKey.conversation("t", "c", "b", "g", "k")
    repo = SessionRepository(engine, "asc")
    conversation_write = f.session_write(of=f.conversation_scope(config="k"))
    first = [
        f.stored_session(key, version=1),
        f.stored_session(conversation, version=1, write=conversation_write),
    ]
    assert len(upsert(repo, first).written) == 2
    migrate.upgrade(database_url.url)
    newer = [dataclasses.replace(s, version=2) for s in first]
    assert upsert(repo, newer).written == sorted(
        [(key, 2), (conversation, 2)], key=lambda entry: entry[0].sort_key()
    )
    columns = (
        "key_prefix, owner_type, tenant_id, workflow_id, workflow_run_id, conversation_id,"
        " node_id, node_execution_id, binding_id, agent_id, app_id, agent_config_snapshot_id,"
        " status, version, snapshot, layer_specs, created_at, updated_at, lineage"
    )
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT count(*) FROM {TABLE_NAME}")).scalar_one() == 2
        for owner in ("workflow_run", "conversation"):  # a second row of the same key
            copy = (
                f"INSERT INTO {TABLE_NAME} ({columns}) SELECT {columns} FROM {TABLE_NAME}"
                f" WHERE owner_type = '{owner}'"
            )
            with pytest.raises(sa.exc.IntegrityError, match=f"{owner.split('_')[0]}_scope"):
                conn.execute(sa.text(copy))
            conn.rollback()
    repo.close()
    migrate.downgrade(database_url.url, "0005")
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        uniques = {u["name"] for u in inspector.get_unique_constraints(TABLE_NAME)}
        predicates = {
            index["name"]: index["dialect_options"].get("postgresql_where")
            for index in inspector.get_indexes(TABLE_NAME)
        }
    assert uniques == {
        "agent_runtime_session_workflow_scope_unique",
        "agent_runtime_session_conversation_scope_unique",
    }
    assert predicates["agent_runtime_session_workflow_lookup_idx"] is None
    assert predicates["agent_runtime_session_conversation_lookup_idx"] is None


def test_snapshot_column_is_lz4_compressed_as_the_model_declares(
    database_url: Database, engine: Engine
) -> None:
    migrate.upgrade(database_url.url)
    with engine.connect() as conn:
        stored = column_compression(conn)
    codes = {"lz4": "l", "pglz": "p"}
    declared = {c.name: codes[c.info.get("compression", "")] for c in sessions.c if c.info}
    assert declared == {"snapshot": "l"}
    assert {name: stored[name] for name in declared} == declared
    assert all(code == "" for name, code in stored.items() if name not in declared)


def test_schema_comparison_sees_a_model_that_drifted(
    database_url: Database, engine: Engine
) -> None:
    """Guards the equality test above against comparing nothing."""
    migrate.upgrade(database_url.url)
    drifted = sa.MetaData()
    owners.to_metadata(drifted)
    table = sessions.to_metadata(drifted)
    table.append_column(sa.Column("extra", sa.Integer, nullable=True))
    table.c.status.type = sa.String(32)
    sa.Index("drifted_idx", table.c.agent_id)
    with engine.connect() as conn:
        kinds = {
            diff[0] if isinstance(diff, tuple) else diff[0][0]
            for diff in schema_diff(conn, drifted)
        }
    assert kinds == {"add_column", "modify_type", "add_index"}


def test_current_is_none_before_and_head_after_upgrade(database_url: Database) -> None:
    assert migrate.current(database_url.url) is None
    migrate.upgrade(database_url.url)
    assert migrate.current(database_url.url) == migrate.head() == HEAD


def test_upgrade_twice_is_a_no_op(database_url: Database, engine: Engine) -> None:
    migrate.upgrade(database_url.sqlalchemy_url)
    migrate.upgrade(database_url.url)
    assert migrate.current(database_url.sqlalchemy_url) == HEAD
    with engine.connect() as conn:
        assert schema_diff(conn) == []


_RACER = """
import sys, time
from pathlib import Path
from persistence import migrate
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.001)
migrate.upgrade(sys.argv[1])
"""


def test_concurrent_upgrades_of_a_fresh_database_all_succeed(
    database_url: Database, engine: Engine, tmp_path: Path
) -> None:
    """Workers starting together may all run ``migrate``; they must take turns, not collide."""
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, database_url.url, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for proc in procs:  # every racer has imported everything and is spinning on the start line
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    go.touch()
    errors = [proc.communicate(timeout=60)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, errors
    assert migrate.current(database_url.url) == HEAD
    with engine.connect() as conn:
        assert schema_diff(conn) == []


def test_downgrade_to_base_then_upgrade_again_restores_the_schema(
    database_url: Database, engine: Engine
) -> None:
    migrate.upgrade(database_url.url)
    migrate.downgrade(database_url.url, "base")
    assert migrate.current(database_url.url) is None
    with engine.connect() as conn:
        assert not table_exists(conn)
    migrate.upgrade(database_url.url)
    assert migrate.current(database_url.url) == HEAD
    with engine.connect() as conn:
        assert schema_diff(conn) == []
        assert column_compression(conn)["snapshot"] == "l"


OLD_COLUMNS = (
    "tenant_id, app_id, workflow_id, workflow_run_id, node_id, node_execution_id, binding_id,"
    " agent_id, agent_config_snapshot_id, status, version, snapshot, layer_specs,"
    " backend_run_id, pending_form_id, pending_tool_call_id, closed_by, cleanup_error,"
    " cleaned_at, created_at, updated_at"
)


def test_upgrading_0001_to_head_keeps_every_session_row(
    database_url: Database, engine: Engine
) -> None:
    """0002 adds ``lineage`` (NULL for old rows: the fence then matches any lineage) and the
    runs table; rows written under 0001 survive unchanged, under 0004's names."""
    migrate.upgrade(database_url.url, "0001")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO workflow_agent_runtime_sessions ({OLD_COLUMNS}) VALUES ("
                "'t', 'a', 'w', 'r', 'n', 'e', 'b', 'g', 'c', 'active', 7, '\\x80', '[]', "
                "NULL, NULL, NULL, NULL, NULL, NULL, now(), now())"
            )
        )
    migrate.upgrade(database_url.url)
    with engine.connect() as conn:
        row = conn.execute(sa.text(f"SELECT version, lineage, owner_type FROM {TABLE_NAME}")).one()
        assert tuple(row) == (7, None, "workflow_run")
        assert schema_diff(conn) == []


def test_upgrading_0003_to_head_keeps_sessions_and_ended_runs_as_workflow_owned(
    database_url: Database, engine: Engine
) -> None:
    """0004 (conversations): every session row and every ended run written under 0003 is
    still there, byte for byte, owned by its workflow run; the repository reads, fences and
    reconciles them; a conversation's rows then live beside them; a downgrade keeps them."""
    migrate.upgrade(database_url.url, "0003")
    snapshot = encode("snapshot", f.snapshot("history", state={"n": 1}))
    specs = (
        '[{"name":"history","type":"pydantic_ai.history","deps":{},"metadata":{},"config":1e+23}]'
    )
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO workflow_agent_runtime_sessions ({OLD_COLUMNS}, lineage) VALUES ("
                "'t', 'a', 'w', 'r', 'n', 'e', 'b', 'g', 'c', 'active', 7, :snapshot, :specs, "
                "'backend-7', 'form-1', 'call-1', NULL, NULL, NULL, now(), now(), 'lineage-1')"
            ),
            {"snapshot": snapshot, "specs": specs},
        )
        conn.execute(
            sa.text(
                "INSERT INTO workflow_agent_runs (tenant_id, workflow_run_id, outcome, ended_at,"
                " next_check_at) VALUES ('t', 'ended-run', 'failed', now(), now())"
            )
        )
        before = (
            conn.execute(sa.text("SELECT * FROM workflow_agent_runtime_sessions")).mappings().one()
        )
    migrate.upgrade(database_url.url)
    repo = SessionRepository(engine, "asc")
    key = SessionKey("t", "r", "n", "b", "g")
    with engine.connect() as conn:
        after = conn.execute(sa.text(f"SELECT * FROM {TABLE_NAME}")).mappings().one()
    assert {**after} == {
        **before,
        "owner_type": "workflow_run",
        "conversation_id": None,
        "key_prefix": "asc",
        "content_id": None,
    }
    found = repo.get(key)
    assert found is not None and found.version == 7 and found.lineage == "lineage-1"
    assert found.snapshot_raw == snapshot and found.data.pending_form_id == "form-1"
    end = repo.end_of(Owner("t", "ended-run"))
    assert end is not None and end.outcome == "failed" and not end.settled
    assert repo.claim_due_owners(limit=10, recheck_after_s=60) == [Owner("t", "ended-run")]

    stale = dataclasses.replace(found, version=6)
    assert upsert(repo, [stale]).fenced  # the fence holds on the old row
    newer = dataclasses.replace(found, version=8)
    assert upsert(repo, [newer]).written == [(key, 8)]
    chat = SessionKey.conversation("t", "r", "b", "g", "c")  # the same IDs, another owner
    chat_row = dataclasses.replace(found, key=chat, data=_conversation_write(found))
    assert upsert(repo, [chat_row]).written == [(chat, 7)]
    assert {s.key for s in repo.list_owner(chat.owner)} == {chat}

    migrate.downgrade(database_url.url, "0003")
    with engine.connect() as conn:
        kept = conn.execute(
            sa.text("SELECT workflow_run_id, version FROM workflow_agent_runtime_sessions")
        ).all()
        runs_kept = conn.execute(sa.text("SELECT workflow_run_id FROM workflow_agent_runs")).all()
    assert [tuple(r) for r in kept] == [("r", 8)]  # the conversation's row is dropped
    assert [tuple(r) for r in runs_kept] == [("ended-run",)]
    repo.close()


def _conversation_write(session: StoredSession) -> SessionWrite:
    return dataclasses.replace(session.data, workflow_id=None, node_execution_id=None)


def test_upgrading_0004_to_head_gives_every_row_the_migrating_deployments_prefix(
    database_url: Database, engine: Engine
) -> None:
    """0005 (deployments): rows written under 0004 become the rows of the deployment that
    migrates (its ASC_KEY_PREFIX); another deployment's rows of the same keys then live
    beside them, and neither repository sees the other's sessions or ended owners."""
    migrate.upgrade(database_url.url, "0004")
    snapshot = encode("snapshot", f.snapshot("history", state={"n": 1}))
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO {TABLE_NAME} (owner_type, {OLD_COLUMNS}) VALUES ('workflow_run', "
                "'t', 'a', 'w', 'r', 'n', 'e', 'b', 'g', 'c', 'active', 7, :snapshot, '[]', "
                "NULL, NULL, NULL, NULL, NULL, NULL, now(), now())"
            ),
            {"snapshot": snapshot},
        )
        conn.execute(
            sa.text(
                "INSERT INTO agent_session_owners (tenant_id, owner_type, owner_id, outcome,"
                " ended_at, next_check_at) VALUES ('t', 'workflow_run', 'r', 'failed', now(),"
                " now())"
            )
        )
    migrate.upgrade(database_url.url, key_prefix="prod")
    key, owner = SessionKey("t", "r", "n", "b", "g"), Owner("t", "r")
    prod, other = SessionRepository(engine, "prod"), SessionRepository(engine, "asc")
    found = prod.get(key)
    assert found is not None and found.version == 7 and found.content_id is None
    assert prod.end_of(owner) is not None and other.end_of(owner) is None
    assert other.get(key) is None and other.claim_due_owners(limit=10, recheck_after_s=1) == []
    theirs = dataclasses.replace(found, version=2, lineage="theirs")
    assert upsert(other, [theirs]).written == [(key, 2)]  # the same key, another deployment
    assert prod.get(key) == found and prod.claim_due_owners(limit=10, recheck_after_s=1) == [owner]
    with engine.connect() as conn:
        assert schema_diff(conn) == []
    prod.close()
    other.close()
