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
from cache.records import RunRef
from persistence.errors import translate_errors
from persistence.models import runs
from persistence.selects import OWNER_ROW, interval_of, is_owner, owner_of


@dataclass(frozen=True, slots=True)
class RunEnd:
    """The durable record of an ended run."""

    outcome: str
    ended_at: datetime
    settled: bool


def read_run_end(conn: Connection, prefix: str, run: RunRef) -> RunEnd | None:
    """``run``'s end record in the deployment ``prefix``, or ``None`` if it has not ended."""
    query = sa.select(runs.c.outcome, runs.c.ended_at, runs.c.settled_at).where(
        *is_owner(prefix, run)
    )
    row = conn.execute(query).one_or_none()
    return None if row is None else RunEnd(row.outcome, row.ended_at, row.settled_at is not None)


class OwnerRecords:
    """The owners-table side of :class:`persistence.repository.SessionRepository` (a mixin,
    as ``cache.flush_side`` is the store's flush side)."""

    if TYPE_CHECKING:
        engine: Engine
        key_prefix: str

    def record_run_end(
        self, run: RunRef, outcome: str, *, check_after_s: float
    ) -> tuple[RunEnd, bool]:
        """Record that ``run`` ended; the stored record (the first outcome recorded is kept)
        and whether this call recorded it. The reconciler visits the run ``check_after_s``
        from now, unless it is settled first. :class:`InvalidInput` for an outcome the owner
        type does not have (nothing written)."""
        if outcome not in run.owner_type.outcomes:
            raise InvalidInput(
                f"outcome must be one of {sorted(run.owner_type.outcomes)}, got {outcome!r}"
            )
        values = {
            "key_prefix": self.key_prefix,
            "tenant_id": run.tenant_id,
            "owner_type": run.owner_type.value,
            "owner_id": run.owner_id,
            "outcome": outcome,
            "ended_at": sa.func.now(),
            "next_check_at": sa.func.now() + interval_of(check_after_s),
        }
        insert = pg_insert(runs).values(values).on_conflict_do_nothing().returning(runs.c.outcome)
        with translate_errors(), self.engine.begin() as conn:
            inserted = conn.execute(insert).one_or_none() is not None
            found = read_run_end(conn, self.key_prefix, run)
        assert found is not None, "a row this transaction inserted or found"
        return found, inserted

    def run_end(self, run: RunRef) -> RunEnd | None:
        """The durable record of ``run``'s end, or ``None`` if it has not ended."""
        with translate_errors(), self.engine.connect() as conn:
            return read_run_end(conn, self.key_prefix, run)

    def claim_due_runs(self, *, limit: int, recheck_after_s: float) -> list[RunRef]:
        """Up to ``limit`` unsettled ended runs due for a visit, pushed ``recheck_after_s``
        into the future in the same statement (so concurrent reconcilers share the work)."""
        due = (
            sa.select(*OWNER_ROW)
            .where(
                runs.c.key_prefix == self.key_prefix,
                runs.c.settled_at.is_(None),
                runs.c.next_check_at <= sa.func.now(),
            )
            .order_by(runs.c.next_check_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).subquery()
        claim = (
            sa.update(runs)
            .where(
                runs.c.key_prefix == due.c.key_prefix,
                runs.c.tenant_id == due.c.tenant_id,
                runs.c.owner_type == due.c.owner_type,
                runs.c.owner_id == due.c.owner_id,
            )
            .values(next_check_at=sa.func.now() + interval_of(recheck_after_s))
            .returning(*OWNER_ROW)
        )
        with translate_errors(), self.engine.begin() as conn:
            return [owner_of(row) for row in conn.execute(claim).all()]

    def settle_run(self, run: RunRef) -> None:
        """Every session of the ended run is cleaned: the reconciler stops visiting it."""
        self._update_run(run, settled_at=sa.func.now())

    def recheck_runs(self, refs: Iterable[RunRef]) -> None:
        """Have the reconciler visit these ended runs now (a flush met a save it refused)."""
        for run in set(refs):
            self._update_run(run, settled_at=None, next_check_at=sa.func.now())

    def _update_run(self, run: RunRef, **values: Any) -> None:
        query = sa.update(runs).where(*is_owner(self.key_prefix, run)).values(**values)
        with translate_errors(), self.engine.begin() as conn:
            conn.execute(query)

    def count_unsettled_runs(self) -> int:
        """Ended runs not settled yet (operators' ``stats``: the reconciler's backlog)."""
        query = (
            sa.select(sa.func.count())
            .select_from(runs)
            .where(runs.c.key_prefix == self.key_prefix, runs.c.settled_at.is_(None))
        )
        with translate_errors(), self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
