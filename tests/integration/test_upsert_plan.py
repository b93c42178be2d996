"""The flush's fenced upsert reads one owner's rows per row, whatever the statistics.

With one index per key shared by both owners, Postgres planned the fence's stored-version
lookup on a never-analyzed table (autovacuum off, a fresh or bulk-loaded table) through the
conversation index by ``(key_prefix, tenant_id)`` alone, and read every row of a tenant per
flushed row (``auto_explain``: 2,857 rows read per row among 20,000). Each owner's indexes
are partial now (``persistence.models.OWNER_ROWS``): the plan below is asserted on a table
that is known to have no statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cache.records import OwnerType, SessionKey
from persistence import migrate
from persistence.engine import create_engine
from persistence.models import TABLE_NAME, sessions
from persistence.rows import row_of_session
from persistence.upsert import _UPSERTS
from tests import factories as f
from tests.servers import Database

TENANT = "tenant-1"
RUNS, NODES = 400, 10
"""4,000 rows of one tenant: per lookup, the old plan read them all; one run holds 10."""
CONVERSATIONS, CONFIGS = 200, 10
BATCH = 20
PREFIX = "asc"


@pytest.fixture
def engine(database_url: Database) -> Iterator[Engine]:
    migrate.upgrade(database_url.url)
    engine = create_engine(database_url.url)
    with engine.begin() as conn:  # this test's own database: no statistics, ever
        conn.execute(sa.text(f"ALTER TABLE {TABLE_NAME} SET (autovacuum_enabled = false)"))
    yield engine
    engine.dispose()


def seed(engine: Engine) -> None:
    """Rows of both owners of one tenant, as a bulk load leaves them (never analyzed)."""
    common = "'app', 'cfg', 'active', 3, convert_to(repeat('x', 2000), 'UTF8'), '[]', now(), now()"
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO {TABLE_NAME} (key_prefix, owner_type, tenant_id, workflow_id,"
                " workflow_run_id, node_id, node_execution_id, binding_id, agent_id,"
                " app_id, agent_config_snapshot_id, status, version, snapshot, layer_specs,"
                " created_at, updated_at)"
                f" SELECT :prefix, 'workflow_run', :tenant, 'wf', 'run-' || (i / {NODES}),"
                f" 'node-' || (i % {NODES}), 'exec', 'binding-1', 'agent-1', {common}"
                f" FROM generate_series(0, {RUNS * NODES - 1}) AS i"
            ),
            {"prefix": PREFIX, "tenant": TENANT},
        )
        conn.execute(
            sa.text(
                f"INSERT INTO {TABLE_NAME} (key_prefix, owner_type, tenant_id,"
                " conversation_id, binding_id, agent_id, app_id, agent_config_snapshot_id,"
                " status, version, snapshot, layer_specs, created_at, updated_at)"
                f" SELECT :prefix, 'conversation', :tenant, 'conv-' || (i / {CONFIGS}),"
                f" 'binding-1', 'agent-1', 'app', 'cfg-' || (i % {CONFIGS}), 'active', 3,"
                " convert_to(repeat('x', 2000), 'UTF8'), '[]', now(), now()"
                f" FROM generate_series(0, {CONVERSATIONS * CONFIGS - 1}) AS i"
            ),
            {"prefix": PREFIX, "tenant": TENANT},
        )
        analyzed = conn.execute(
            sa.text(
                "SELECT last_analyze IS NULL AND last_autoanalyze IS NULL"
                " FROM pg_stat_user_tables WHERE relname = :table"
            ),
            {"table": TABLE_NAME},
        ).scalar_one()
    assert analyzed, "the table must have no statistics for this test to mean anything"


def batch_keys(owner: OwnerType) -> list[SessionKey]:
    """``BATCH`` existing keys of ``owner``, spread over the table."""
    if owner is OwnerType.WORKFLOW_RUN:
        return [
            f.session_key(tenant=TENANT, run=f"run-{i * 17 % RUNS}", node=f"node-{i % NODES}",
                          binding="binding-1", agent="agent-1")
            for i in range(BATCH)
        ]  # fmt: skip
    return [
        SessionKey.conversation(
            TENANT, f"conv-{i * 7 % CONVERSATIONS}", "binding-1", "agent-1", f"cfg-{i % CONFIGS}"
        )
        for i in range(BATCH)
    ]


def plan_of(engine: Engine, owner: OwnerType) -> dict[str, Any]:
    """``EXPLAIN ANALYZE`` of the flusher's statement for a batch of newer versions of
    existing rows (rolled back)."""
    now = datetime.now(UTC)
    rows = []
    for key in batch_keys(owner):
        workflow = owner is OwnerType.WORKFLOW_RUN
        scope = f.scope() if workflow else f.conversation_scope(config=key.config_id)
        write = f.session_write(of=scope)
        session = f.stored_session(key, version=4, flushed_version=3, write=write)
        rows.append(row_of_session(session, now))
    rows = [dataclasses.replace(row, known_version=3) for row in rows]
    upsert = _UPSERTS[owner]
    with engine.connect() as conn, conn.begin() as transaction:
        explained = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + upsert.sql.decode(),
            upsert.params(rows, PREFIX),
        ).scalar_one()
        transaction.rollback()
    plan: dict[str, Any] = explained[0]["Plan"]
    return plan


def scans_of_sessions(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if node.get("Relation Name") == TABLE_NAME:
        yield node
    for child in node.get("Plans", []):
        yield from scans_of_sessions(child)


def own_indexes(owner: OwnerType) -> set[str]:
    column = "workflow_run_id" if owner is OwnerType.WORKFLOW_RUN else "conversation_id"
    return {str(index.name) for index in sessions.indexes if column in index.columns}


@pytest.mark.parametrize("owner", list(OwnerType), ids=lambda o: o.value)
def test_the_fences_lookup_reads_one_owners_rows_on_a_table_without_statistics(
    engine: Engine, owner: OwnerType
) -> None:
    seed(engine)
    plan = plan_of(engine, owner)
    scans = list(scans_of_sessions(plan))
    lookups = [scan for scan in scans if scan["Node Type"] != "ModifyTable"]
    assert lookups, plan
    for scan in lookups:
        assert scan.get("Index Name") in own_indexes(owner), scan
        read_per_lookup = scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0)
        assert read_per_lookup <= max(NODES, CONFIGS), scan
    assert plan["Actual Rows"] == BATCH  # every row of the batch was written
