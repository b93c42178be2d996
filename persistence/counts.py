"""What operators read across tenants (``agent-sessions stats``, ``cleanup list``): counts
by status and owner, sessions of one status, cleanups that gave up."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cache.records import SessionStatus, StoredSession
from persistence.errors import translate_errors
from persistence.models import sessions


class OperatorCounts:
    """The operators' side of :class:`persistence.repository.SessionRepository` (a mixin)."""

    if TYPE_CHECKING:
        engine: Engine

        def _rows(self, query: sa.Select[Any]) -> list[StoredSession]: ...

    def count_cleanup_failures(self) -> int:
        """How many sessions' cleanups gave up (``cleaned`` with an error)."""
        query = sa.select(sa.func.count()).where(
            sessions.c.status == "cleaned", sessions.c.cleanup_error.is_not(None)
        )
        with translate_errors(), self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def count_by_status(self) -> dict[str, int]:
        """Rows per status, across tenants (operators' ``stats``)."""
        query = sa.select(sessions.c.status, sa.func.count()).group_by(sessions.c.status)
        with translate_errors(), self.engine.connect() as conn:
            return {str(status): int(n) for status, n in conn.execute(query).all()}

    def count_by_owner_and_status(self) -> dict[str, dict[str, int]]:
        """Rows per owner type and status, across tenants (operators' ``stats``)."""
        query = sa.select(sessions.c.owner_type, sessions.c.status, sa.func.count()).group_by(
            sessions.c.owner_type, sessions.c.status
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
            .where(sessions.c.status == SessionStatus(status).value)
            .order_by(sessions.c.updated_at)
            .limit(limit)
        )
        return self._rows(query)

    def cleanup_failures(self, *, limit: int) -> list[StoredSession]:
        """Sessions whose end-of-workflow cleanup gave up (``cleaned`` with an error)."""
        query = (
            sa.select(sessions)
            .where(
                sessions.c.status == SessionStatus.CLEANED.value,
                sessions.c.cleanup_error.is_not(None),
            )
            .order_by(sessions.c.updated_at.desc())
            .limit(limit)
        )
        return self._rows(query)
