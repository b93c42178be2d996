"""``SessionRepository``: every Postgres read and write of the sessions, one object.

Each job lives in its own module, and the repository class inherits them (as the Redis store
inherits its flush side): the flush's fenced upsert (``persistence.upsert``), the ended
owners (``persistence.owners``), the operators' counts (``persistence.counts``). Here are
the reads of sessions: read-through, an owner's sessions, the reconciler's and the
conversation sweep's candidates. Rows become ``StoredSession`` records at one boundary
(``persistence.selects.from_row``); what is written is a ``persistence.rows.SessionRow``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cache.records import Owner, OwnerType, SessionKey, SessionStatus, StoredSession
from persistence.counts import OperatorCounts
from persistence.direct import DirectConnections
from persistence.engine import CONNECT_TIMEOUT_S
from persistence.errors import translate_errors
from persistence.models import sessions
from persistence.owners import OwnerEnd, OwnerRecords, read_end
from persistence.selects import (
    ACTIVE,
    KEY_ORDER,
    by_key_query,
    conversation_ended,
    from_row,
    key_of,
    of_owner,
)
from persistence.upsert import FencedUpsert


class SessionRepository(FencedUpsert, OwnerRecords, OperatorCounts):
    """Reads and fenced writes of the sessions table; every call is one short transaction.

    Every call is scoped to one deployment, ``key_prefix`` (its Redis key prefix): it reads
    and writes that deployment's rows only, in both tables."""

    def __init__(self, engine: Engine, key_prefix: str) -> None:
        self.engine = engine
        self.key_prefix = key_prefix
        self._direct = DirectConnections(engine.url, connect_timeout_s=CONNECT_TIMEOUT_S)

    def close(self) -> None:
        """Close the flush's direct connections and dispose the engine's pool."""
        self._direct.close()
        self.engine.dispose()

    def unsettled(self, owner: Owner) -> dict[SessionKey, int]:
        """The owner's rows that are not ``cleaned`` yet: key → version (no snapshots read)."""
        query = (
            sa.select(*KEY_ORDER, sessions.c.version)
            .where(
                *of_owner(self.key_prefix, owner), sessions.c.status != SessionStatus.CLEANED.value
            )
            .order_by(*KEY_ORDER)
        )
        with translate_errors(), self.engine.connect() as conn:
            return {key_of(row): row["version"] for row in conn.execute(query).mappings()}

    def get_with_run(self, key: SessionKey) -> tuple[StoredSession | None, OwnerEnd | None]:
        """The stored session of ``key`` and its run's end record, on one connection."""
        run = key.owner
        with translate_errors(), self.engine.connect() as conn:
            row = conn.execute(by_key_query(self.key_prefix, key)).mappings().one_or_none()
            return (None if row is None else from_row(row)), read_end(conn, self.key_prefix, run)

    def get(self, key: SessionKey) -> StoredSession | None:
        """The stored session of ``key`` in any status (read-through fills Redis with it)."""
        with translate_errors(), self.engine.connect() as conn:
            row = conn.execute(by_key_query(self.key_prefix, key)).mappings().one_or_none()
        return None if row is None else from_row(row)

    def list_owner(self, owner: Owner, status: SessionStatus | None = None) -> list[StoredSession]:
        """Every session of one owner, optionally of one status, in key order."""
        query = sa.select(sessions).where(*of_owner(self.key_prefix, owner))
        if status is not None:
            query = query.where(sessions.c.status == SessionStatus(status).value)
        return self._rows(query.order_by(*KEY_ORDER))

    def other_active_configs(self, key: SessionKey) -> list[SessionKey]:
        """A conversation's ``active`` sessions of the same binding and agent under another
        config snapshot (a turn with ``key``'s config retires them)."""
        if key.owner_type is not OwnerType.CONVERSATION:
            return []
        query = sa.select(*KEY_ORDER).where(
            *of_owner(self.key_prefix, key.owner),
            sessions.c.binding_id == key.binding_id,
            sessions.c.agent_id == key.agent_id,
            sessions.c.agent_config_snapshot_id != key.config_id,
            sessions.c.status == ACTIVE,
        )
        with translate_errors(), self.engine.connect() as conn:
            return [key_of(row) for row in conn.execute(query).mappings()]

    def idle_conversation_keys(self, *, before: datetime, limit: int) -> list[SessionKey]:
        """Up to ``limit`` ``active`` conversation sessions last saved before ``before`` (a
        time of Redis's clock, which stamped ``updated_at``) and not waiting for human input,
        oldest first, of conversations that have not ended (an ended one's are the
        reconciler's)."""
        query = (
            sa.select(*KEY_ORDER)
            .where(
                sessions.c.key_prefix == self.key_prefix,
                sessions.c.owner_type == OwnerType.CONVERSATION.value,
                sessions.c.status == ACTIVE,
                sessions.c.updated_at < before,
                sessions.c.pending_form_id.is_(None),
                sessions.c.pending_tool_call_id.is_(None),
                ~conversation_ended(),
            )
            .order_by(sessions.c.updated_at)
            .limit(limit)
        )
        with translate_errors(), self.engine.connect() as conn:
            return [key_of(row) for row in conn.execute(query).mappings()]

    def stalled_conversation_cleanups(self, *, before: datetime, limit: int) -> list[SessionKey]:
        """Up to ``limit`` conversation sessions ``cleaning`` since before ``before`` (Redis's
        clock) in conversations that have not ended (an ended one's are the reconciler's)."""
        query = (
            sa.select(*KEY_ORDER)
            .where(
                sessions.c.key_prefix == self.key_prefix,
                sessions.c.owner_type == OwnerType.CONVERSATION.value,
                sessions.c.status == SessionStatus.CLEANING.value,
                sessions.c.updated_at < before,
                ~conversation_ended(),
            )
            .order_by(sessions.c.updated_at)
            .limit(limit)
        )
        with translate_errors(), self.engine.connect() as conn:
            return [key_of(row) for row in conn.execute(query).mappings()]

    def _rows(self, query: sa.Select[Any]) -> list[StoredSession]:
        """Run a read of whole rows and convert each at the one boundary."""
        with translate_errors(), self.engine.connect() as conn:
            return [from_row(row) for row in conn.execute(query).mappings().all()]
