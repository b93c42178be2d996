"""Ended runs as durable facts, and each session's lineage.

Adds ``workflow_agent_runs`` (one row per ended run) and the nullable ``lineage`` column of
the sessions table. Existing rows keep a NULL lineage, which the flush fence treats as "any
lineage", so sessions saved before the upgrade flush as before. Hand-written and frozen, like
0001.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

SESSIONS = "workflow_agent_runtime_sessions"
RUNS = "workflow_agent_runs"


def upgrade() -> None:
    op.add_column(SESSIONS, sa.Column("lineage", sa.String(32), nullable=True))
    op.create_table(
        RUNS,
        sa.Column("tenant_id", sa.String(255), nullable=False),
        sa.Column("workflow_run_id", sa.String(255), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_check_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "workflow_run_id", name=op.f(f"{RUNS}_pkey")),
        sa.CheckConstraint(
            "outcome IN ('aborted', 'failed', 'partial_succeeded', 'succeeded')",
            name=op.f(f"ck_{RUNS}_outcome"),
        ),
    )
    op.create_index(
        op.f(f"{RUNS}_unsettled_due_idx"),
        RUNS,
        ["next_check_at"],
        postgresql_where=sa.text("settled_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table(RUNS)
    op.drop_column(SESSIONS, "lineage")
