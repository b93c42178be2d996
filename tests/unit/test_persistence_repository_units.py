"""The parts of the repository that need no server: results, batch shaping, row conversion."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from persistence.engine import create_engine
from persistence.rows import _to_datetime as to_datetime
from persistence.rows import newest_per_key, row_of_session
from persistence.selects import to_iso
from persistence.upsert import UpsertResult
from tests.factories import session_key, stored_session


def test_fenced_entries_split_into_stale_equal_and_ahead() -> None:
    a, b, c = (session_key(node=f"n{i}") for i in range(3))
    result = UpsertResult(written=[(a, 3)], fenced=[(b, 4, 4), (c, 9, 2)])
    assert result.stale_equal == [(b, 4, 4)]
    assert result.ahead == [(c, 9, 2)]


def test_a_batch_collapses_to_one_session_per_key_in_key_order() -> None:
    low, high = session_key(node="a"), session_key(node="b")
    batch = [
        stored_session(high, version=1),
        stored_session(low, version=3),
        stored_session(high, version=7),
        stored_session(low, version=2),
    ]
    rows = [row_of_session(session, datetime.now(UTC)) for session in batch]
    assert [(r.key, r.version) for r in newest_per_key(rows)] == [(low, 3), (high, 7)]


@pytest.mark.parametrize(
    "text",
    ["2024-01-02T03:04:05.123+00:00", "2024-01-02T03:04:05.123456+00:00"],
)
def test_utc_timestamps_survive_the_round_trip_through_datetime(text: str) -> None:
    assert to_iso(to_datetime(text)) == text


def test_offset_and_naive_timestamps_come_back_as_utc() -> None:
    assert to_iso(to_datetime("2024-01-02T05:04:05.123+02:00")) == "2024-01-02T03:04:05.123+00:00"
    assert to_iso(to_datetime("2024-01-02T03:04:05.123")) == "2024-01-02T03:04:05.123+00:00"
    assert to_datetime(None) is None


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p%40ss@db:5432/x",
        "postgres://u:p%40ss@db:5432/x",
        "postgresql+psycopg://u:p%40ss@db:5432/x",
    ],
)
def test_create_engine_uses_psycopg_3_for_every_postgres_url(url: str) -> None:
    engine = create_engine(url)
    assert engine.url.drivername == "postgresql+psycopg"
    assert engine.url.password == "p@ss"
    engine.dispose()
