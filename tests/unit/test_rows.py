"""Rows built straight from a hash's bytes equal rows built from the record; anything this
library would not have written is refused naming the field."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from cache.codec import Codec
from cache.errors import CorruptValue
from cache.records import ClosedBy, SessionStatus, StoredSession
from persistence.rows import COLUMNS, HASH_FIELDS, SessionRow, row_of_hash, row_of_session
from tests.factories import conversation_scope, session_key, session_write, stored_session

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
NAME = "asc:{s001}:session:t:r:n:b:a"


def as_dict(row: SessionRow) -> dict[str, object]:
    return dict(zip(COLUMNS, row.values, strict=True))


def hash_values(session: StoredSession) -> list[bytes | None]:
    """The HMGET reply for HASH_FIELDS of the hash ``fill`` would write for ``session``."""
    pairs = Codec().stored_fields(session)
    stored = {str(pairs[i]): pairs[i + 1] for i in range(0, len(pairs), 2) if pairs[i + 1] != ""}
    return [
        value if isinstance(value, bytes) else value.encode() if value is not None else None
        for value in (stored.get(field) for field in HASH_FIELDS)
    ]


def rich() -> StoredSession:
    write = dataclasses.replace(session_write(), backend_run_id="run-9", pending_form_id="form-1")
    return dataclasses.replace(
        stored_session(session_key(), version=7, status=SessionStatus.CLEANED, write=write),
        closed_by=ClosedBy.WORKFLOW_END,
        cleanup_error="backend said no",
        cleaned_at="2024-01-01T00:00:01.500+00:00",
        lineage="abcdef0123456789",
    )


@pytest.mark.parametrize("session", [stored_session(session_key()), rich()], ids=["plain", "rich"])
def test_a_row_from_hash_bytes_equals_the_row_from_the_record(session: StoredSession) -> None:
    from_hash = row_of_hash(NAME, session.key, hash_values(session), NOW)
    assert from_hash == row_of_session(session, NOW)
    assert set(as_dict(from_hash)) == set(COLUMNS)


def test_missing_times_become_now_and_missing_options_none() -> None:
    session = dataclasses.replace(stored_session(session_key()), created_at=None, updated_at=None)
    row = as_dict(row_of_hash(NAME, session.key, hash_values(session), NOW))
    assert row["created_at"] == row["updated_at"] == NOW
    assert row["pending_form_id"] is None and row["closed_by"] is None


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("version", b"seven", "not an integer"),
        ("status", b"sleeping", "unknown SessionStatus"),
        ("closed_by", b"someone", "unknown ClosedBy"),
        ("snapshot", b"\x81\xa1a", "not a stored snapshot"),
        ("snapshot", b"\x80trailing", "not a stored snapshot"),
        ("snapshot", b'{"layers": [', "not a stored snapshot"),
        ("layer_specs", b"\x91\x01", "not a msgpack layer_specs"),
        ("created_at", b"yesterday", "not an ISO-8601 time"),
        ("app_id", b"\xff\xfe", "not UTF-8 text"),
        ("app_id", None, "missing"),
        ("snapshot", None, "missing"),
    ],
)
def test_a_foreign_value_is_corrupt_naming_the_field(
    field: str, value: bytes | None, reason: str
) -> None:
    session = stored_session(session_key())
    values = hash_values(session)
    values[HASH_FIELDS.index(field)] = value
    with pytest.raises(CorruptValue) as caught:
        row_of_hash(NAME, session.key, values, NOW)
    assert (caught.value.key, caught.value.field) == (NAME, field)
    assert reason in caught.value.reason


def test_a_conversations_row_has_its_owner_columns_and_its_keys_config() -> None:
    """The owner columns come from the key (a conversation's: no run, no node); a hash whose
    config is not the key's is refused naming the field, never written under another key."""
    turn = conversation_scope(config="config-1")
    session = stored_session(turn.key, write=session_write(of=turn))
    name = "asc:{s001}:conversation-session:t:c:b:a:config-1"
    row = as_dict(row_of_hash(name, session.key, hash_values(session), NOW))
    assert row == as_dict(row_of_session(session, NOW))
    owner = ("owner_type", "workflow_run_id", "conversation_id", "node_id", "workflow_id")
    assert tuple(row[c] for c in owner) == ("conversation", None, "conversation-1", None, None)
    assert row["agent_config_snapshot_id"] == "config-1"
    other = conversation_scope(config="config-2").key
    with pytest.raises(CorruptValue) as info:
        row_of_hash(name, other, hash_values(session), NOW)
    assert info.value.field == "agent_config_snapshot_id"
