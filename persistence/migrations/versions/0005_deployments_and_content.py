"""Deployments sharing one database, and the content identity of a row.

Every row of both tables says which deployment it belongs to (``key_prefix``: the Redis key
prefix, ``ASC_KEY_PREFIX``), and both tables' keys and lookup indexes start with it, so that
deployments sharing a database never read, reconcile or settle each other's sessions and
owners. Existing rows are given the prefix of the deployment that runs this migration
(``agent-sessions migrate`` hands in its ``ASC_KEY_PREFIX``; ``asc`` otherwise).
``content_id`` is the id of the save whose snapshot a row holds: the flush's fence tells two
saves of one version apart by it. Existing rows have none, which matches any. Hand-written
and frozen, like 0001.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

SESSIONS = "agent_runtime_sessions"
RUNS = "agent_session_owners"
DEFAULT_PREFIX = "asc"
WORKFLOW_KEY = ("tenant_id", "workflow_run_id", "node_id", "binding_id", "agent_id")
CONVERSATION_KEY = (
    "tenant_id",
    "conversation_id",
    "binding_id",
    "agent_id",
    "agent_config_snapshot_id",
)
UNIQUES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("agent_runtime_session_workflow_scope_unique", WORKFLOW_KEY),
    ("agent_runtime_session_conversation_scope_unique", CONVERSATION_KEY),
)
LOOKUPS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("agent_runtime_session_workflow_lookup_idx", ("tenant_id", "workflow_run_id", "status"), ""),
    (
        "agent_runtime_session_conversation_lookup_idx",
        ("tenant_id", "conversation_id", "status"),
        "",
    ),
    (
        "agent_runtime_session_conversation_idle_idx",
        ("updated_at",),
        "owner_type = 'conversation' AND status = 'active'",
    ),
    (
        "agent_runtime_session_conversation_cleaning_idx",
        ("updated_at",),
        "owner_type = 'conversation' AND status = 'cleaning'",
    ),
)
RUNS_KEY = ("tenant_id", "owner_type", "owner_id")
RUNS_DUE = "agent_session_owners_unsettled_due_idx"


def _prefix() -> str:
    """The prefix of the deployment running the migration (``persistence.migrate``)."""
    config = op.get_context().config
    prefix = config.attributes.get("key_prefix") if config is not None else None
    return str(prefix or DEFAULT_PREFIX)


def _add_prefix(table: str, prefix: str) -> None:
    op.add_column(
        table, sa.Column("key_prefix", sa.String(32), nullable=False, server_default=prefix)
    )
    op.alter_column(table, "key_prefix", server_default=None)


def _rekey(with_prefix: bool) -> None:
    """Drop and create the unique keys and lookup indexes, led by key_prefix or not."""
    lead = ("key_prefix",) if with_prefix else ()
    for name, columns in UNIQUES:
        op.drop_constraint(op.f(name), SESSIONS, type_="unique")
        op.create_unique_constraint(op.f(name), SESSIONS, [*lead, *columns])
    for name, columns, where in LOOKUPS:
        op.drop_index(op.f(name), SESSIONS)
        op.create_index(
            op.f(name),
            SESSIONS,
            [*lead, *columns],
            postgresql_where=sa.text(where) if where else None,
        )
    op.drop_constraint(op.f(f"{RUNS}_pkey"), RUNS, type_="primary")
    op.create_primary_key(op.f(f"{RUNS}_pkey"), RUNS, [*lead, *RUNS_KEY])
    op.drop_index(op.f(RUNS_DUE), RUNS)
    op.create_index(
        op.f(RUNS_DUE),
        RUNS,
        [*lead, "next_check_at"],
        postgresql_where=sa.text("settled_at IS NULL"),
    )


def upgrade() -> None:
    prefix = _prefix()
    _add_prefix(SESSIONS, prefix)
    _add_prefix(RUNS, prefix)
    op.add_column(SESSIONS, sa.Column("content_id", sa.String(32), nullable=True))
    _rekey(with_prefix=True)


def downgrade() -> None:
    """Back to one deployment per database: fails if two prefixes share a session key."""
    _rekey(with_prefix=False)
    op.drop_column(SESSIONS, "content_id")
    op.drop_column(RUNS, "key_prefix")
    op.drop_column(SESSIONS, "key_prefix")
