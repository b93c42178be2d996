"""Session rows as the fenced upsert writes them, built from a record or straight from the
bytes of a Redis hash.

The flush never builds a :class:`~cache.records.StoredSession`: it reads the hash fields that
are columns (``HMGET`` of :data:`HASH_FIELDS`, which have the columns' names) and turns each
value into its column value here. The snapshot's bytes (its JSON text; an earlier build's
msgpack) go to the ``bytea`` column as they are, after a structural check (msgspec ``Raw``:
one complete document, no trailing bytes; the contents were checked in full when the
session was saved). The layer specs become
JSON text once per distinct spec list (a workflow's sessions share a few).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from cache.clock import parse_iso
from cache.codec import WRITE_TEXT_FIELDS, encode_specs_json, specs_json_of
from cache.errors import CorruptValue
from cache.records import (
    ClosedBy,
    OwnerType,
    SessionKey,
    SessionStatus,
    StoredSession,
    check_write_fits,
)
from cache.snapshot_json import check_stored, stored_text
from persistence.models import OWNER_COLUMNS, sessions

COLUMNS: Final = tuple(
    column.name
    for column in sessions.columns
    if column.name not in {"id", "flushed_at", "key_prefix"}
)
"""The columns a flush writes, in table order (the upsert's array parameters); the
repository adds its deployment's ``key_prefix`` to every row of a statement."""
HASH_FIELDS: Final = tuple(name for name in COLUMNS if name not in OWNER_COLUMNS)
"""The session hash fields that are columns (same names); the owner and key columns come from
the key name."""
_STATUSES: Final = frozenset(status.value for status in SessionStatus)
_CLOSERS: Final = frozenset(closer.value for closer in ClosedBy)
_SPECS_JSON_KEPT: Final = 256


@dataclass(frozen=True, slots=True)
class SessionRow:
    """One session as the upsert writes it, plus what the fence and the sorting of its
    answer need."""

    key: SessionKey
    version: int
    status: str
    lineage: str | None
    content_id: str | None
    values: tuple[Any, ...]
    """Column values in :data:`COLUMNS` order."""
    known_version: int | None = None
    """The highest version this Redis copy knows reached Postgres (``mark_flushing``):
    Postgres holding a higher one means Redis went back in time, and the row is refused.
    ``None``: not known (a record, or a hash an earlier build saved), not checked."""


def owner_values(key: SessionKey) -> tuple[str | None, ...]:
    """The values of :data:`~persistence.models.OWNER_COLUMNS` for ``key``."""
    if key.owner_type is OwnerType.WORKFLOW_RUN:
        workflow_run_id, conversation_id, node_id = key.owner_id, None, key.node_id
    else:
        workflow_run_id, conversation_id, node_id = None, key.owner_id, None
    return (
        key.owner_type.value,
        key.tenant_id,
        workflow_run_id,
        conversation_id,
        node_id,
        key.binding_id,
        key.agent_id,
    )


# --- from a record ---------------------------------------------------------------------------


def _to_datetime(text: str | None) -> datetime | None:
    """Parse the stored ISO text; a naive time is taken as UTC, as ``cache.clock`` writes."""
    if not text:
        return None
    value = parse_iso(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def row_of_session(session: StoredSession, now: datetime) -> SessionRow:
    """The row of a record; a missing created/updated time becomes ``now``."""
    data = session.data
    check_write_fits(session.key, data)
    known: dict[str, Any] = dict(zip(OWNER_COLUMNS, owner_values(session.key), strict=True))
    known |= {name: getattr(data, name) for name in WRITE_TEXT_FIELDS}
    known |= {
        "status": session.status.value,
        "version": session.version,
        "snapshot": stored_text(data.snapshot, session.snapshot_raw),
        "layer_specs": encode_specs_json(data.layer_specs),
        "closed_by": session.closed_by.value if session.closed_by else None,
        "cleanup_error": session.cleanup_error,
        "lineage": session.lineage,
        "content_id": session.content_id,
        "cleaned_at": _to_datetime(session.cleaned_at),
        "created_at": _to_datetime(session.created_at) or now,
        "updated_at": _to_datetime(session.updated_at) or now,
    }
    values = tuple(known[name] for name in COLUMNS)
    return SessionRow(
        session.key,
        session.version,
        session.status.value,
        session.lineage,
        session.content_id,
        values,
    )


# --- from the bytes of a hash ----------------------------------------------------------------

Convert = Callable[[bytes], Any]


class _Bad(ValueError):
    """A hash value that is not what this library writes (becomes ``CorruptValue``)."""


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise _Bad("not UTF-8 text") from exc


def _version(raw: bytes) -> int:
    try:
        return int(raw)
    except ValueError as exc:
        raise _Bad(f"not an integer: {raw!r}") from exc


def _status(raw: bytes) -> str:
    text = _text(raw)
    if text not in _STATUSES:
        raise _Bad(f"unknown SessionStatus: {text!r}")
    return text


def _closed_by(raw: bytes) -> str:
    text = _text(raw)
    if text not in _CLOSERS:
        raise _Bad(f"unknown ClosedBy: {text!r}")
    return text


def _snapshot(raw: bytes) -> bytes:
    try:
        check_stored(raw)
    except msgspec.DecodeError as exc:
        raise _Bad(f"not a stored snapshot: {exc}") from exc
    return raw


@functools.lru_cache(maxsize=_SPECS_JSON_KEPT)
def _layer_specs(raw: bytes) -> str:
    try:
        return specs_json_of(raw)
    except (msgspec.DecodeError, ValueError) as exc:
        raise _Bad(f"not a msgpack layer_specs: {exc}") from exc


def _time(raw: bytes) -> datetime:
    try:
        value = parse_iso(_text(raw))
    except ValueError as exc:
        raise _Bad(f"not an ISO-8601 time: {raw!r}") from exc
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


_CONVERT: Final[dict[str, Convert]] = {
    "status": _status,
    "closed_by": _closed_by,
    "version": _version,
    "snapshot": _snapshot,
    "layer_specs": _layer_specs,
    "cleaned_at": _time,
    "created_at": _time,
    "updated_at": _time,
}
_REQUIRED: Final = (
    "app_id",
    "agent_config_snapshot_id",
    "status",
    "version",
    "snapshot",
    "layer_specs",
)
_FIELD_CONVERT: Final = tuple(_CONVERT.get(name, bytes.decode) for name in HASH_FIELDS)
_AT: Final = {name: HASH_FIELDS.index(name) for name in HASH_FIELDS}
_REQUIRED_AT: Final = tuple(_AT[name] for name in _REQUIRED)
_NOW_IF_MISSING_AT: Final = (_AT["created_at"], _AT["updated_at"])
_PICK: Final = operator.itemgetter(
    *(
        OWNER_COLUMNS.index(name) if name in OWNER_COLUMNS else len(OWNER_COLUMNS) + _AT[name]
        for name in COLUMNS
    )
)
"""From ``[*owner values, *converted hash values]`` to the row in column order, in C
(``workflow_id`` and ``node_execution_id`` a workflow run's row must have are the table's
CHECK to enforce: this library always writes them)."""


def row_of_hash(
    name: str,
    key: SessionKey,
    values: Sequence[bytes | None],
    now: datetime,
    known_version: int | None = None,
) -> SessionRow:
    """The row of session hash ``name`` from its :data:`HASH_FIELDS` values (``HMGET``);
    :class:`CorruptValue` names the field of anything this library would not have written
    (a missing or empty value is absent, as a save writes none)."""
    try:
        converted: list[Any] = [
            convert(raw) if raw else None
            for convert, raw in zip(_FIELD_CONVERT, values, strict=True)
        ]
    except ValueError:
        raise _corrupt(name, values) from None
    for at in _REQUIRED_AT:
        if converted[at] is None:
            raise CorruptValue(name, HASH_FIELDS[at], "missing")
    for at in _NOW_IF_MISSING_AT:
        if converted[at] is None:
            converted[at] = now
    config = converted[_AT["agent_config_snapshot_id"]]
    if key.config_id and config != key.config_id:  # a conversation's config is its key's
        raise CorruptValue(name, "agent_config_snapshot_id", f"{config!r} is not the key's")
    row: tuple[Any, ...] = _PICK([*owner_values(key), *converted])
    version, status = converted[_AT["version"]], converted[_AT["status"]]
    lineage, content_id = converted[_AT["lineage"]], converted[_AT["content_id"]]
    return SessionRow(key, version, status, lineage, content_id, row, known_version)


def _corrupt(name: str, values: Sequence[bytes | None]) -> CorruptValue:
    """The first field whose value does not convert, and why."""
    for field, convert, raw in zip(HASH_FIELDS, _FIELD_CONVERT, values, strict=True):
        if not raw:
            continue
        try:
            (_text if convert is bytes.decode else convert)(raw)
        except _Bad as exc:
            return CorruptValue(name, field, str(exc))
    return CorruptValue(name, "<hash>", "a value does not convert")


def newest_per_key(rows: Iterable[SessionRow]) -> list[SessionRow]:
    """One row per key (the highest version), sorted by key.

    Postgres refuses an upsert that touches one row twice, so duplicates collapse here.
    Sorting gives every flush the same lock order, so two overlapping flushes (a sweep and
    a triggered flush) wait for each other instead of deadlocking.
    """
    newest: dict[SessionKey, SessionRow] = {}
    for row in rows:
        kept = newest.get(row.key)
        if kept is None or row.version > kept.version:
            newest[row.key] = row
    return [newest[key] for key in sorted(newest, key=SessionKey.sort_key)]
