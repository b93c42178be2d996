"""The durable record of owners that ended (``agent_session_owners``): a workflow run or a
conversation is ended once a row here says so, whatever Redis says, and the reconciler visits
each until it is settled (every session cleaned and flushed). Every row belongs to the
repository's deployment (``key_prefix``); no query reads or changes another's."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine

from cache.errors import InvalidInput
from cache.records import Owner
from persistence.errors import translate_errors
from persistence.models import owners
from persistence.selects import OWNER_ROW, interval_of, is_owner, owner_of


@dataclass(frozen=True, slots=True)
class OwnerEnd:
    """The durable record of an ended run."""

    outcome: str
    ended_at: datetime
    settled: bool


def read_end(conn: Connection, prefix: str, owner: Owner) -> OwnerEnd | None:
    """``owner``'s end record in the deployment ``prefix``, or ``None`` if it has not ended."""
    query = sa.select(owners.c.outcome, owners.c.ended_at, owners.c.settled_at).where(
        *is_owner(prefix, owner)
    )
    row = conn.execute(query).one_or_none()
    return None if row is None else OwnerEnd(row.outcome, row.ended_at, row.settled_at is not None)


class OwnerRecords:
    """The owners-table side of :class:`persistence.repository.SessionRepository` (a mixin,
    as ``cache.flush_side`` is the store's flush side)."""

    if TYPE_CHECKING:
        engine: Engine
        key_prefix: str

    def record_end(
        self, owner: Owner, outcome: str, *, check_after_s: float
    ) -> tuple[OwnerEnd, bool]:
        """Record that ``owner`` ended; the stored record (the first outcome recorded is kept)
        and whether this call recorded it. The reconciler visits the owner ``check_after_s``
        from now, unless it is settled first. :class:`InvalidInput` for an outcome the owner
        type does not have (nothing written)."""
        if outcome not in owner.owner_type.outcomes:
            raise InvalidInput(
                f"outcome must be one of {sorted(owner.owner_type.outcomes)}, got {outcome!r}"
            )
        values = {
            "key_prefix": self.key_prefix,
            "tenant_id": owner.tenant_id,
            "owner_type": owner.owner_type.value,
            "owner_id": owner.owner_id,
            "outcome": outcome,
            "ended_at": sa.func.now(),
            "next_check_at": sa.func.now() + interval_of(check_after_s),
        }
        insert = (
            pg_insert(owners).values(values).on_conflict_do_nothing().returning(owners.c.outcome)
        )
        with translate_errors(), self.engine.begin() as conn:
            inserted = conn.execute(insert).one_or_none() is not None
            found = read_end(conn, self.key_prefix, owner)
        assert found is not None, "a row this transaction inserted or found"
        return found, inserted

    def end_of(self, owner: Owner) -> OwnerEnd | None:
        """The durable record of ``owner``'s end, or ``None`` if it has not ended."""
        with translate_errors(), self.engine.connect() as conn:
            return read_end(conn, self.key_prefix, owner)

    def claim_due_owners(self, *, limit: int, recheck_after_s: float) -> list[Owner]:
        """Up to ``limit`` unsettled ended runs due for a visit, pushed ``recheck_after_s``
        into the future in the same statement (so concurrent reconcilers share the work)."""
        due = (
            sa.select(*OWNER_ROW)
            .where(
                owners.c.key_prefix == self.key_prefix,
                owners.c.settled_at.is_(None),
                owners.c.next_check_at <= sa.func.now(),
            )
            .order_by(owners.c.next_check_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).subquery()
        claim = (
            sa.update(owners)
            .where(
                owners.c.key_prefix == due.c.key_prefix,
                owners.c.tenant_id == due.c.tenant_id,
                owners.c.owner_type == due.c.owner_type,
                owners.c.owner_id == due.c.owner_id,
            )
            .values(next_check_at=sa.func.now() + interval_of(recheck_after_s))
            .returning(*OWNER_ROW)
        )
        with translate_errors(), self.engine.begin() as conn:
            return [owner_of(row) for row in conn.execute(claim).all()]

    def settle_owner(self, owner: Owner) -> None:
        """Every session of the ended owner is cleaned: the reconciler stops visiting it."""
        self._update_owner(owner, settled_at=sa.func.now())

    def recheck_owners(self, refs: Iterable[Owner]) -> None:
        """Have the reconciler visit these ended runs now (a flush met a save it refused)."""
        for run in set(refs):
            self._update_owner(run, settled_at=None, next_check_at=sa.func.now())

    def _update_owner(self, owner: Owner, **values: Any) -> None:
        query = sa.update(owners).where(*is_owner(self.key_prefix, owner)).values(**values)
        with translate_errors(), self.engine.begin() as conn:
            conn.execute(query)

    def count_unsettled_owners(self) -> int:
        """Ended runs not settled yet (operators' ``stats``: the reconciler's backlog)."""
        query = (
            sa.select(sa.func.count())
            .select_from(owners)
            .where(owners.c.key_prefix == self.key_prefix, owners.c.settled_at.is_(None))
        )
        with translate_errors(), self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
