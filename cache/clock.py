"""The text form of stored times (ISO-8601 UTC): parsing what Redis and Postgres hold, and
writing it for the benches and scripts that make rows themselves."""

from __future__ import annotations

from datetime import UTC, datetime


def now_iso() -> str:
    """The current time as ISO-8601 UTC text with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text)
