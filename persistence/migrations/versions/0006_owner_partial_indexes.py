"""Each owner's unique key and lookup index hold only that owner's rows.

The unique keys become partial unique indexes and the lookup indexes partial indexes, on
``workflow_run_id IS NOT NULL`` (a workflow run's rows) or ``conversation_id IS NOT NULL``
(a conversation's). Their rows and uniqueness do not change (the other owner's rows held
NULL in them, and NULLs never collide); what changes is that a query naming one owner's id
can no longer be planned on the other owner's index by the two columns both share,
``(key_prefix, tenant_id)``, which Postgres did without statistics, reading every row of a
tenant per lookup. Like 0005, the indexes are rebuilt in the migration's transaction (the
table is locked meanwhile). Hand-written and frozen, like 0001.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

SESSIONS = "agent_runtime_sessions"
WORKFLOW_ROWS = "workflow_run_id IS NOT NULL"
CONVERSATION_ROWS = "conversation_id IS NOT NULL"
UNIQUES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "agent_runtime_session_workflow_scope_unique",
        ("key_prefix", "tenant_id", "workflow_run_id", "node_id", "binding_id", "agent_id"),
        WORKFLOW_ROWS,
    ),
    (
        "agent_runtime_session_conversation_scope_unique",
        (
            "key_prefix",
            "tenant_id",
            "conversation_id",
            "binding_id",
            "agent_id",
            "agent_config_snapshot_id",
        ),
        CONVERSATION_ROWS,
    ),
)
LOOKUPS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "agent_runtime_session_workflow_lookup_idx",
        ("key_prefix", "tenant_id", "workflow_run_id", "status"),
        WORKFLOW_ROWS,
    ),
    (
        "agent_runtime_session_conversation_lookup_idx",
        ("key_prefix", "tenant_id", "conversation_id", "status"),
        CONVERSATION_ROWS,
    ),
)


def upgrade() -> None:
    for name, columns, where in UNIQUES:
        op.drop_constraint(op.f(name), SESSIONS, type_="unique")
        op.create_index(
            op.f(name), SESSIONS, list(columns), unique=True, postgresql_where=sa.text(where)
        )
    for name, columns, where in LOOKUPS:
        op.drop_index(op.f(name), SESSIONS)
        op.create_index(op.f(name), SESSIONS, list(columns), postgresql_where=sa.text(where))


def downgrade() -> None:
    for name, columns, _ in UNIQUES:
        op.drop_index(op.f(name), SESSIONS)
        op.create_unique_constraint(op.f(name), SESSIONS, list(columns))
    for name, columns, _ in LOOKUPS:
        op.drop_index(op.f(name), SESSIONS)
        op.create_index(op.f(name), SESSIONS, list(columns))
