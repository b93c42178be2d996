"""The ``agent_runtime_sessions`` and ``agent_session_owners`` tables (DESIGN §8).

One sessions table serves both owners (``owner_type``): a workflow run's sessions are keyed by
``(tenant_id, workflow_run_id, node_id, binding_id, agent_id)``, a conversation's by
``(tenant_id, conversation_id, binding_id, agent_id, agent_config_snapshot_id)``; a CHECK
says which columns each owner fills. Each owner's unique key and lookup index are partial
indexes holding only that owner's rows (``OWNER_ROWS``): a query naming a workflow run (or a
conversation) can then never be planned on the other owner's index by the two columns they
share, ``(key_prefix, tenant_id)``. Without statistics (autovacuum off, a fresh or bulk-loaded
table) Postgres did exactly that for the flush fence's stored-version lookup, and read every
row of a tenant per flushed row (0.87 ms per row among 20,000; docs/persistence.md). Any
equality on the owner's id implies the predicate, so no query has to repeat it.

Every row of both tables belongs to one deployment, named by its Redis key prefix
(``key_prefix``), which leads every key and index: deployments sharing a database never see
each other's rows.

Core rather than an ORM mapping: the only writer is the flush job's batch upsert, which is
one ``INSERT ... SELECT FROM unnest(...)`` statement, and reads convert rows to
``cache.records.StoredSession`` at one boundary anyway, so mapped classes would add a second
record type for nothing.

Every constraint and index has a fixed name so the hand-written migrations can refer to it;
the naming convention covers anything added later without an explicit name.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSON

from cache.records import OWNER_OUTCOMES, OwnerType, SessionStatus

TABLE_NAME: Final = "agent_runtime_sessions"
SCOPE_UNIQUE: Final = "agent_runtime_session_workflow_scope_unique"
CONVERSATION_UNIQUE: Final = "agent_runtime_session_conversation_scope_unique"
RUN_STATUS_INDEX: Final = "agent_runtime_session_workflow_lookup_idx"
CONVERSATION_STATUS_INDEX: Final = "agent_runtime_session_conversation_lookup_idx"
CONVERSATION_IDLE_INDEX: Final = "agent_runtime_session_conversation_idle_idx"
CONVERSATION_CLEANING_INDEX: Final = "agent_runtime_session_conversation_cleaning_idx"
BACKEND_RUN_INDEX: Final = "agent_runtime_session_backend_run_idx"
STATUS_CHECK: Final = "status"
OWNER_CHECK: Final = "owner"
OWNERS_TABLE_NAME: Final = "agent_session_owners"
OWNERS_DUE_INDEX: Final = "agent_session_owners_unsettled_due_idx"
LINEAGE_LENGTH: Final = 32
KEY_PREFIX_LENGTH: Final = 32
"""``Settings.key_prefix`` is 1-32 characters of ``[A-Za-z0-9._-]``."""
CONTENT_ID_LENGTH: Final = 32
SNAPSHOT_COMPRESSION: Final = "lz4"
# ``layer_specs`` is ``json``, not ``jsonb``: jsonb rewrites numbers (a config's ``1e+23``
# comes back as the integer 100000000000000000000000) and reorders keys, and the specs must
# reach the backend's cleanup run exactly as they were saved. Query it as ``layer_specs::jsonb``.
"""TOAST compression of ``snapshot``; lz4 is ~3x the batch throughput of pglz (docs)."""

KEY_COLUMNS: Final = {
    OwnerType.WORKFLOW_RUN: ("tenant_id", "workflow_run_id", "node_id", "binding_id", "agent_id"),
    OwnerType.CONVERSATION: (
        "tenant_id",
        "conversation_id",
        "binding_id",
        "agent_id",
        "agent_config_snapshot_id",
    ),
}
"""Each owner's five session-key columns, in ``SessionKey.parts()`` order."""
UNIQUE_COLUMNS: Final = {owner: ("key_prefix", *names) for owner, names in KEY_COLUMNS.items()}
"""Each owner's unique key: the deployment, then the session key (the upsert's conflict
target)."""
OWNER_ROWS: Final = {
    OwnerType.WORKFLOW_RUN: "workflow_run_id IS NOT NULL",
    OwnerType.CONVERSATION: "conversation_id IS NOT NULL",
}
"""The predicate of each owner's partial indexes: its rows (the CHECK ``owner`` makes the
owner's id column non-NULL exactly for them)."""
OWNER_COLUMNS: Final = (
    "owner_type",
    "tenant_id",
    "workflow_run_id",
    "conversation_id",
    "node_id",
    "binding_id",
    "agent_id",
)
"""The columns a session's key decides (``agent_config_snapshot_id`` is saved with every
session, so it comes from the hash, which holds the key's config for a conversation)."""

NAMING_CONVENTION: Final = {
    "pk": "%(table_name)s_pkey",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

_STATUS_VALUES = ", ".join(f"'{status.value}'" for status in SessionStatus)
_OUTCOME_VALUES = ", ".join(f"'{outcome}'" for outcome in sorted(OWNER_OUTCOMES))
_OWNER_VALUES = ", ".join(f"'{owner.value}'" for owner in OwnerType)
_OWNER_SHAPE = (
    "(owner_type = 'workflow_run' AND workflow_run_id IS NOT NULL AND node_id IS NOT NULL"
    " AND workflow_id IS NOT NULL AND node_execution_id IS NOT NULL"
    " AND conversation_id IS NULL)"
    " OR (owner_type = 'conversation' AND conversation_id IS NOT NULL"
    " AND workflow_run_id IS NULL AND node_id IS NULL)"
)


def _id_column(name: str, *, nullable: bool = False) -> Column[str]:
    return Column(name, String(255), nullable=nullable)


def _time_column(name: str, *, nullable: bool) -> Column[datetime]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


sessions = Table(
    TABLE_NAME,
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("key_prefix", String(KEY_PREFIX_LENGTH), nullable=False),
    Column("owner_type", String(32), nullable=False),
    _id_column("tenant_id"),
    _id_column("app_id"),
    _id_column("workflow_id", nullable=True),
    _id_column("workflow_run_id", nullable=True),
    _id_column("conversation_id", nullable=True),
    _id_column("node_id", nullable=True),
    _id_column("node_execution_id", nullable=True),
    _id_column("binding_id"),
    _id_column("agent_id"),
    _id_column("agent_config_snapshot_id"),
    Column("status", String(16), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("snapshot", LargeBinary, nullable=False, info={"compression": SNAPSHOT_COMPRESSION}),
    Column("layer_specs", JSON, nullable=False),
    _id_column("backend_run_id", nullable=True),
    _id_column("pending_form_id", nullable=True),
    _id_column("pending_tool_call_id", nullable=True),
    Column("lineage", String(LINEAGE_LENGTH), nullable=True),
    Column("content_id", String(CONTENT_ID_LENGTH), nullable=True),
    Column("closed_by", String(32), nullable=True),
    Column("cleanup_error", Text, nullable=True),
    _time_column("cleaned_at", nullable=True),
    _time_column("created_at", nullable=False),
    _time_column("updated_at", nullable=False),
    Column("flushed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(f"status IN ({_STATUS_VALUES})", name=STATUS_CHECK),
    CheckConstraint(f"owner_type IN ({_OWNER_VALUES}) AND ({_OWNER_SHAPE})", name=OWNER_CHECK),
    Index(
        SCOPE_UNIQUE,
        *UNIQUE_COLUMNS[OwnerType.WORKFLOW_RUN],
        unique=True,
        postgresql_where=text(OWNER_ROWS[OwnerType.WORKFLOW_RUN]),
    ),
    Index(
        CONVERSATION_UNIQUE,
        *UNIQUE_COLUMNS[OwnerType.CONVERSATION],
        unique=True,
        postgresql_where=text(OWNER_ROWS[OwnerType.CONVERSATION]),
    ),
    Index(
        RUN_STATUS_INDEX,
        "key_prefix",
        "tenant_id",
        "workflow_run_id",
        "status",
        postgresql_where=text(OWNER_ROWS[OwnerType.WORKFLOW_RUN]),
    ),
    Index(
        CONVERSATION_STATUS_INDEX,
        "key_prefix",
        "tenant_id",
        "conversation_id",
        "status",
        postgresql_where=text(OWNER_ROWS[OwnerType.CONVERSATION]),
    ),
    Index(
        CONVERSATION_IDLE_INDEX,
        "key_prefix",
        "updated_at",
        postgresql_where=text("owner_type = 'conversation' AND status = 'active'"),
    ),
    Index(
        CONVERSATION_CLEANING_INDEX,
        "key_prefix",
        "updated_at",
        postgresql_where=text("owner_type = 'conversation' AND status = 'cleaning'"),
    ),
    Index(BACKEND_RUN_INDEX, "backend_run_id"),
)
"""One row per session key: the last flushed version of the Redis hash."""

owners = Table(
    OWNERS_TABLE_NAME,
    metadata,
    Column("key_prefix", String(KEY_PREFIX_LENGTH), nullable=False),
    _id_column("tenant_id"),
    Column("owner_type", String(32), nullable=False),
    _id_column("owner_id"),
    Column("outcome", String(32), nullable=False),
    _time_column("ended_at", nullable=False),
    _time_column("settled_at", nullable=True),
    _time_column("next_check_at", nullable=False),
    PrimaryKeyConstraint(
        "key_prefix", "tenant_id", "owner_type", "owner_id", name=f"{OWNERS_TABLE_NAME}_pkey"
    ),
    CheckConstraint(f"outcome IN ({_OUTCOME_VALUES})", name="outcome"),
    Index(
        OWNERS_DUE_INDEX, "key_prefix", "next_check_at", postgresql_where=text("settled_at IS NULL")
    ),
)
"""One row per ENDED owner (a workflow run or a conversation): the durable fact that nothing
of it may be resumed.

Written by ``workflow_ended`` / ``conversation_ended`` before Redis is touched. ``settled_at``
is set once every session of the owner is cleaned in Redis and Postgres; until then the
reconciler visits it at ``next_check_at``. Open owners have no row (their state lives in
Redis only).
"""
