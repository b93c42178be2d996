"""``layer_specs`` becomes ``json``: stored exactly as written.

``jsonb`` normalises numbers and key order: a config value ``1e+23`` came back as the integer
100000000000000000000000, so a cleanup run replayed a different spec from the one the node
sent. ``json`` keeps the text (Postgres still checks it is JSON); query it as
``layer_specs::jsonb``. Existing rows convert in place. Hand-written and frozen, like 0001.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

SESSIONS = "workflow_agent_runtime_sessions"


def upgrade() -> None:
    op.alter_column(
        SESSIONS,
        "layer_specs",
        type_=postgresql.JSON(),
        existing_type=postgresql.JSONB(),
        existing_nullable=False,
        postgresql_using="layer_specs::json",
    )


def downgrade() -> None:
    op.alter_column(
        SESSIONS,
        "layer_specs",
        type_=postgresql.JSONB(),
        existing_type=postgresql.JSON(),
        existing_nullable=False,
        postgresql_using="layer_specs::jsonb",
    )
