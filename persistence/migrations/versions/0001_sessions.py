"""Create workflow_agent_runtime_sessions.

Hand-written, and frozen: it spells out every column and name instead of importing
``persistence.models``, so later model changes cannot rewrite history; the tests in
``tests/integration/test_migrations.py`` prove head equals the models. Names are wrapped in
``op.f()`` because Alembic would otherwise pass them through the models' naming convention.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

TABLE = "workflow_agent_runtime_sessions"
SCOPE_COLUMNS = (
    "tenant_id",
    "app_id",
    "workflow_id",
    "workflow_run_id",
    "node_id",
    "node_execution_id",
    "binding_id",
    "agent_id",
    "agent_config_snapshot_id",
)


def _columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), primary_key=True),
        *(sa.Column(name, sa.String(255), nullable=False) for name in SCOPE_COLUMNS),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("snapshot", sa.LargeBinary(), nullable=False),
        sa.Column("layer_specs", postgresql.JSONB(), nullable=False),
        sa.Column("backend_run_id", sa.String(255), nullable=True),
        sa.Column("pending_form_id", sa.String(255), nullable=True),
        sa.Column("pending_tool_call_id", sa.String(255), nullable=True),
        sa.Column("closed_by", sa.String(32), nullable=True),
        sa.Column("cleanup_error", sa.Text(), nullable=True),
        sa.Column("cleaned_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "flushed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    ]


def upgrade() -> None:
    op.create_table(
        TABLE,
        *_columns(),
        sa.PrimaryKeyConstraint("id", name=op.f("workflow_agent_runtime_sessions_pkey")),
        sa.CheckConstraint(
            "status IN ('active', 'cleaning', 'cleaned')",
            name=op.f("ck_workflow_agent_runtime_sessions_status"),
        ),
        sa.UniqueConstraint(
            "tenant_id",
            "workflow_run_id",
            "node_id",
            "binding_id",
            "agent_id",
            name=op.f("workflow_agent_runtime_session_scope_unique"),
        ),
    )
    op.create_index(
        op.f("workflow_agent_runtime_session_run_status_idx"),
        TABLE,
        ["tenant_id", "workflow_run_id", "status"],
    )
    op.create_index(
        op.f("workflow_agent_runtime_session_backend_run_idx"), TABLE, ["backend_run_id"]
    )
    # lz4 instead of the default pglz: pglz on ~8 KB msgpack snapshots is the write-behind
    # bottleneck (docs/persistence.md). Needs a server built with lz4 (PostgreSQL >= 14).
    op.execute(f"ALTER TABLE {TABLE} ALTER COLUMN snapshot SET COMPRESSION lz4")


def downgrade() -> None:
    op.drop_table(TABLE)
