"""What operators read across the tenants of their deployment (``agent-sessions stats``,
``cleanup list``, ``audit``): counts by status and owner, sessions of one status, cleanups
that gave up, and what the audit compares with Redis."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cache.records import Owner, OwnerType, SessionKey, SessionStatus, StoredSession
from persistence.errors import translate_errors
from persistence.models import owners, sessions
from persistence.selects import (
    ACTIVE,
    KEY_ORDER,
    KEYS,
    OWNER_ROW,
    interval_of,
    key_of,
    owner_of,
    owner_row,
)


@dataclass(frozen=True, slots=True)
class RowBrief:
    """What the audit compares of a row: its version, content id and status."""

    version: int
    content_id: str | None
    status: SessionStatus


_BRIEF: Final = (sessions.c.version, sessions.c.content_id, sessions.c.status)


class OperatorCounts:
    """The operators' side of :class:`persistence.repository.SessionRepository` (a mixin)."""

    if TYPE_CHECKING:
        engine: Engine
        key_prefix: str

        def _rows(self, query: sa.Select[Any]) -> list[StoredSession]: ...

    @property
    def _mine(self) -> sa.ColumnElement[bool]:
        """The deployment's rows."""
        return sessions.c.key_prefix == self.key_prefix

    def count_cleanup_failures(self) -> int:
        """How many sessions' cleanups gave up (``cleaned`` with an error)."""
        query = sa.select(sa.func.count()).where(
            self._mine, sessions.c.status == "cleaned", sessions.c.cleanup_error.is_not(None)
        )
        with translate_errors(), self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def count_by_status(self) -> dict[str, int]:
        """Rows per status, across tenants (operators' ``stats``)."""
        query = (
            sa.select(sessions.c.status, sa.func.count())
            .where(self._mine)
            .group_by(sessions.c.status)
        )
        with translate_errors(), self.engine.connect() as conn:
            return {str(status): int(n) for status, n in conn.execute(query).all()}

    def count_by_owner_and_status(self) -> dict[str, dict[str, int]]:
        """Rows per owner type and status, across tenants (operators' ``stats``)."""
        query = (
            sa.select(sessions.c.owner_type, sessions.c.status, sa.func.count())
            .where(self._mine)
            .group_by(sessions.c.owner_type, sessions.c.status)
        )
        found: dict[str, dict[str, int]] = {}
        with translate_errors(), self.engine.connect() as conn:
            for owner, status, n in conn.execute(query).all():
                found.setdefault(str(owner), {})[str(status)] = int(n)
        return found

    def list_status(self, status: SessionStatus, *, limit: int) -> list[StoredSession]:
        """Up to ``limit`` sessions of one status across tenants, oldest update first."""
        query = (
            sa.select(sessions)
            .where(self._mine, sessions.c.status == SessionStatus(status).value)
            .order_by(sessions.c.updated_at)
            .limit(limit)
        )
        return self._rows(query)

    def cleanup_failures(self, *, limit: int) -> list[StoredSession]:
        """Sessions whose end-of-workflow cleanup gave up (``cleaned`` with an error)."""
        query = (
            sa.select(sessions)
            .where(
                self._mine,
                sessions.c.status == SessionStatus.CLEANED.value,
                sessions.c.cleanup_error.is_not(None),
            )
            .order_by(sessions.c.updated_at.desc())
            .limit(limit)
        )
        return self._rows(query)

    def briefs(self, keys: Sequence[SessionKey]) -> dict[SessionKey, RowBrief]:
        """Version, content id and status of each of ``keys`` that Postgres holds (the audit
        compares them with Redis; no snapshot is read)."""
        found: dict[SessionKey, RowBrief] = {}
        with translate_errors(), self.engine.connect() as conn:
            for owner in OwnerType:
                parts = [key.parts() for key in keys if key.owner_type is owner]
                if not parts:
                    continue
                query = sa.select(*KEY_ORDER, *_BRIEF).where(
                    sessions.c.key_prefix == self.key_prefix,
                    sessions.c.owner_type == owner.value,
                    sa.tuple_(*KEYS[owner]).in_(parts),
                )
                for row in conn.execute(query).mappings():
                    status = SessionStatus(row["status"])
                    found[key_of(row)] = RowBrief(row["version"], row["content_id"], status)
        return found

    def active_in_ended_owners(self, *, ended_before_s: float, limit: int) -> list[SessionKey]:
        """Up to ``limit`` ``active`` rows of owners that ended over ``ended_before_s`` ago
        (Postgres's clock on both sides): the end should have stopped them by then."""
        ended = sa.exists().where(
            owners.c.key_prefix == sessions.c.key_prefix,
            owners.c.tenant_id == sessions.c.tenant_id,
            owners.c.owner_type == sessions.c.owner_type,
            owners.c.owner_id
            == sa.func.coalesce(sessions.c.workflow_run_id, sessions.c.conversation_id),
            owners.c.ended_at < sa.func.now() - interval_of(ended_before_s),
        )
        query = (
            sa.select(*KEY_ORDER)
            .where(sessions.c.key_prefix == self.key_prefix, sessions.c.status == ACTIVE, ended)
            .limit(limit)
        )
        with translate_errors(), self.engine.connect() as conn:
            return [key_of(row) for row in conn.execute(query).mappings()]

    def ended_owners(self, owners: Iterable[Owner]) -> set[Owner]:
        """Which of ``owners`` Postgres records as ended."""
        rows = sorted({owner_row(self.key_prefix, owner) for owner in owners})
        if not rows:
            return set()
        query = sa.select(*OWNER_ROW).where(sa.tuple_(*OWNER_ROW).in_(rows))
        with translate_errors(), self.engine.connect() as conn:
            return {owner_of(row) for row in conn.execute(query).all()}
