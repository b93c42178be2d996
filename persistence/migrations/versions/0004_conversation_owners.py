"""Sessions of two owners: workflow runs and conversations, in one table.

``workflow_agent_runtime_sessions`` becomes ``agent_runtime_sessions`` with an ``owner_type``
(``workflow_run`` for every existing row) and a ``conversation_id``; the workflow-only
columns become nullable, and a CHECK says which columns each owner fills. A conversation's
session is unique on ``(tenant_id, conversation_id, binding_id, agent_id,
agent_config_snapshot_id)``. ``workflow_agent_runs`` becomes ``agent_session_owners`` (the
durable record of every ended owner). Every existing row is kept as it was, under the new
names. Hand-written and frozen, like 0001.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

OLD_SESSIONS = "workflow_agent_runtime_sessions"
SESSIONS = "agent_runtime_sessions"
OLD_RUNS = "workflow_agent_runs"
RUNS = "agent_session_owners"
WORKFLOW_ONLY = ("workflow_id", "workflow_run_id", "node_id", "node_execution_id")
OWNER_SHAPE = (
    "owner_type IN ('workflow_run', 'conversation') AND ("
    "(owner_type = 'workflow_run' AND workflow_run_id IS NOT NULL AND node_id IS NOT NULL"
    " AND workflow_id IS NOT NULL AND node_execution_id IS NOT NULL"
    " AND conversation_id IS NULL)"
    " OR (owner_type = 'conversation' AND conversation_id IS NOT NULL"
    " AND workflow_run_id IS NULL AND node_id IS NULL))"
)
OUTCOMES = "outcome IN ('aborted', 'ended', 'failed', 'partial_succeeded', 'succeeded')"
SESSION_RENAMES = (
    # (kind, old name, new name)
    ("CONSTRAINT", "workflow_agent_runtime_sessions_pkey", "agent_runtime_sessions_pkey"),
    ("CONSTRAINT", "ck_workflow_agent_runtime_sessions_status", "ck_agent_runtime_sessions_status"),
    (
        "CONSTRAINT",
        "workflow_agent_runtime_session_scope_unique",
        "agent_runtime_session_workflow_scope_unique",
    ),
    (
        "INDEX",
        "workflow_agent_runtime_session_run_status_idx",
        "agent_runtime_session_workflow_lookup_idx",
    ),
    (
        "INDEX",
        "workflow_agent_runtime_session_backend_run_idx",
        "agent_runtime_session_backend_run_idx",
    ),
)


def _rename(table: str, renames: tuple[tuple[str, str, str], ...]) -> None:
    for kind, old, new in renames:
        if kind == "INDEX":
            op.execute(f"ALTER INDEX {old} RENAME TO {new}")
        else:
            op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT {old} TO {new}")


def upgrade() -> None:
    op.rename_table(OLD_SESSIONS, SESSIONS)
    op.execute(f"ALTER SEQUENCE {OLD_SESSIONS}_id_seq RENAME TO {SESSIONS}_id_seq")
    _rename(SESSIONS, SESSION_RENAMES)
    op.add_column(
        SESSIONS,
        sa.Column("owner_type", sa.String(32), nullable=False, server_default="workflow_run"),
    )
    op.alter_column(SESSIONS, "owner_type", server_default=None)
    op.add_column(SESSIONS, sa.Column("conversation_id", sa.String(255), nullable=True))
    for name in WORKFLOW_ONLY:
        op.alter_column(SESSIONS, name, existing_type=sa.String(255), nullable=True)
    op.create_check_constraint(op.f(f"ck_{SESSIONS}_owner"), SESSIONS, OWNER_SHAPE)
    op.create_unique_constraint(
        op.f("agent_runtime_session_conversation_scope_unique"),
        SESSIONS,
        ["tenant_id", "conversation_id", "binding_id", "agent_id", "agent_config_snapshot_id"],
    )
    op.create_index(
        op.f("agent_runtime_session_conversation_lookup_idx"),
        SESSIONS,
        ["tenant_id", "conversation_id", "status"],
    )
    op.create_index(
        op.f("agent_runtime_session_conversation_idle_idx"),
        SESSIONS,
        ["updated_at"],
        postgresql_where=sa.text("owner_type = 'conversation' AND status = 'active'"),
    )
    op.create_index(
        op.f("agent_runtime_session_conversation_cleaning_idx"),
        SESSIONS,
        ["updated_at"],
        postgresql_where=sa.text("owner_type = 'conversation' AND status = 'cleaning'"),
    )

    op.rename_table(OLD_RUNS, RUNS)
    op.alter_column(RUNS, "workflow_run_id", new_column_name="owner_id")
    op.add_column(
        RUNS, sa.Column("owner_type", sa.String(32), nullable=False, server_default="workflow_run")
    )
    op.alter_column(RUNS, "owner_type", server_default=None)
    op.drop_constraint(op.f(f"{OLD_RUNS}_pkey"), RUNS, type_="primary")
    op.create_primary_key(op.f(f"{RUNS}_pkey"), RUNS, ["tenant_id", "owner_type", "owner_id"])
    op.drop_constraint(op.f(f"ck_{OLD_RUNS}_outcome"), RUNS, type_="check")
    op.create_check_constraint(op.f(f"ck_{RUNS}_outcome"), RUNS, OUTCOMES)
    op.execute(f"ALTER INDEX {OLD_RUNS}_unsettled_due_idx RENAME TO {RUNS}_unsettled_due_idx")


def downgrade() -> None:
    """Back to workflow runs only: conversations' sessions and ends are deleted."""
    op.execute(f"DELETE FROM {RUNS} WHERE owner_type <> 'workflow_run'")  # noqa: S608
    op.execute(f"ALTER INDEX {RUNS}_unsettled_due_idx RENAME TO {OLD_RUNS}_unsettled_due_idx")
    op.drop_constraint(op.f(f"ck_{RUNS}_outcome"), RUNS, type_="check")
    op.create_check_constraint(
        op.f(f"ck_{OLD_RUNS}_outcome"),
        RUNS,
        "outcome IN ('aborted', 'failed', 'partial_succeeded', 'succeeded')",
    )
    op.drop_constraint(op.f(f"{RUNS}_pkey"), RUNS, type_="primary")
    op.create_primary_key(op.f(f"{OLD_RUNS}_pkey"), RUNS, ["tenant_id", "owner_id"])
    op.drop_column(RUNS, "owner_type")
    op.alter_column(RUNS, "owner_id", new_column_name="workflow_run_id")
    op.rename_table(RUNS, OLD_RUNS)

    op.execute(f"DELETE FROM {SESSIONS} WHERE owner_type <> 'workflow_run'")  # noqa: S608
    op.drop_index(op.f("agent_runtime_session_conversation_cleaning_idx"), SESSIONS)
    op.drop_index(op.f("agent_runtime_session_conversation_idle_idx"), SESSIONS)
    op.drop_index(op.f("agent_runtime_session_conversation_lookup_idx"), SESSIONS)
    op.drop_constraint(
        op.f("agent_runtime_session_conversation_scope_unique"), SESSIONS, type_="unique"
    )
    op.drop_constraint(op.f(f"ck_{SESSIONS}_owner"), SESSIONS, type_="check")
    for name in WORKFLOW_ONLY:
        op.alter_column(SESSIONS, name, existing_type=sa.String(255), nullable=False)
    op.drop_column(SESSIONS, "conversation_id")
    op.drop_column(SESSIONS, "owner_type")
    _rename(SESSIONS, tuple((kind, new, old) for kind, old, new in SESSION_RENAMES))
    op.execute(f"ALTER SEQUENCE {SESSIONS}_id_seq RENAME TO {OLD_SESSIONS}_id_seq")
    op.rename_table(SESSIONS, OLD_SESSIONS)
