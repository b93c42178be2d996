"""How rows are selected and read back: the key columns of each owner type, the filters
that pick one owner's rows, and the one place a row becomes a ``StoredSession``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import INTERVAL
from sqlalchemy.engine import RowMapping

from cache.codec import WRITE_TEXT_FIELDS
from cache.records import (
    OWNER_ENDS,
    ClosedBy,
    Owner,
    OwnerType,
    SessionKey,
    SessionStatus,
    SessionWrite,
    StoredSession,
    specs_from_list,
    unchecked,
)
from cache.snapshot_json import frame_of
from persistence.models import KEY_COLUMNS, owners, sessions

KEYS: Final = {
    owner: tuple(sessions.c[name] for name in names) for owner, names in KEY_COLUMNS.items()
}
OWNER_ID: Final = {
    OwnerType.WORKFLOW_RUN: sessions.c.workflow_run_id,
    OwnerType.CONVERSATION: sessions.c.conversation_id,
}
KEY_ORDER: Final = (
    sessions.c.owner_type,
    sessions.c.tenant_id,
    sessions.c.workflow_run_id,
    sessions.c.conversation_id,
    sessions.c.node_id,
    sessions.c.binding_id,
    sessions.c.agent_id,
    sessions.c.agent_config_snapshot_id,
)
"""What a key is read back from (``key_of``), in the order sessions are listed."""
OWNER_ROW: Final = (owners.c.key_prefix, owners.c.tenant_id, owners.c.owner_type, owners.c.owner_id)
"""The owners table's key columns."""
OWNER_CLOSERS: Final = sorted(closer.value for closer in OWNER_ENDS)
ACTIVE: Final = SessionStatus.ACTIVE.value
_DATA_TEXT_COLUMNS: Final = WRITE_TEXT_FIELDS  # SessionWrite fields stored as-is, same names


def to_iso(value: datetime | None) -> str | None:
    """UTC ISO text in ``cache.clock.now_iso``'s format, microseconds only when present."""
    if value is None:
        return None
    spec = "milliseconds" if value.microsecond % 1000 == 0 else "microseconds"
    return value.astimezone(UTC).isoformat(timespec=spec)


def from_row(row: RowMapping) -> StoredSession:
    """The one place a row becomes a record; a row in Postgres is by definition flushed."""
    data = unchecked(
        SessionWrite,
        snapshot=frame_of(row["snapshot"]),
        layer_specs=specs_from_list(row["layer_specs"]),
        **{name: row[name] for name in _DATA_TEXT_COLUMNS},
    )
    return StoredSession(
        key=key_of(row),
        status=SessionStatus(row["status"]),
        version=row["version"],
        flushed_version=row["version"],
        data=data,
        created_at=to_iso(row["created_at"]),
        updated_at=to_iso(row["updated_at"]),
        cleaned_at=to_iso(row["cleaned_at"]),
        closed_by=ClosedBy(row["closed_by"]) if row["closed_by"] else None,
        cleanup_error=row["cleanup_error"],
        lineage=row["lineage"],
        content_id=row["content_id"],
        snapshot_raw=row["snapshot"],
    )


def key_of(row: RowMapping) -> SessionKey:
    owner = OwnerType(row["owner_type"])
    return SessionKey.of_parts(owner, *(row[name] for name in KEY_COLUMNS[owner]))


def by_key_query(prefix: str, key: SessionKey) -> sa.Select[Any]:
    """The deployment's row of ``key``."""
    keys = KEYS[key.owner_type]
    return sa.select(sessions).where(
        sessions.c.key_prefix == prefix,
        sessions.c.owner_type == key.owner_type.value,
        *(col == part for col, part in zip(keys, key.parts(), strict=True)),
    )


def of_owner(prefix: str, owner: Owner) -> tuple[sa.ColumnElement[bool], ...]:
    """The sessions table's rows of ``owner`` in the deployment ``prefix``."""
    return (
        sessions.c.key_prefix == prefix,
        sessions.c.owner_type == owner.owner_type.value,
        sessions.c.tenant_id == owner.tenant_id,
        OWNER_ID[owner.owner_type] == owner.owner_id,
    )


def conversation_ended() -> sa.Exists:
    """The session row's conversation has ended (a row of its deployment in the owners
    table)."""
    return sa.exists().where(
        owners.c.key_prefix == sessions.c.key_prefix,
        owners.c.tenant_id == sessions.c.tenant_id,
        owners.c.owner_type == OwnerType.CONVERSATION.value,
        owners.c.owner_id == sessions.c.conversation_id,
    )


def is_owner(prefix: str, owner: Owner) -> tuple[sa.ColumnElement[bool], ...]:
    """The owners table's row of ``owner`` in the deployment ``prefix``."""
    values = owner_row(prefix, owner)
    return tuple(col == value for col, value in zip(OWNER_ROW, values, strict=True))


def owner_row(prefix: str, owner: Owner) -> tuple[str, str, str, str]:
    return (prefix, owner.tenant_id, owner.owner_type.value, owner.owner_id)


def owner_of(row: Any) -> Owner:
    """The owner of an owners-table row read as :data:`OWNER_ROW`."""
    _, tenant_id, owner_type, owner_id = row
    return Owner(tenant_id, owner_id, OwnerType(owner_type))


def interval_of(seconds: float) -> sa.ColumnElement[Any]:
    return sa.cast(sa.literal(f"{seconds} seconds"), INTERVAL)
