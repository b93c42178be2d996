"""``SessionRepository``: the fenced batch upsert the flush job calls, the read-through reads
and the durable record of ended runs.

A flush writes up to ``flush_batch`` sessions in ONE ``INSERT ... SELECT FROM unnest(...)
ON CONFLICT (key) DO UPDATE ... WHERE <fence>`` statement (DESIGN §5.3). The fence:

* ``stored.version < excluded.version``: a retried, duplicated or out-of-order flush can
  never move a row backwards;
* the same lineage (or either unknown): equal versions of two histories of one key are
  never taken for each other;
* never ``active`` again once the workflow's end closed the row, and never an ``active``
  row for a run ``agent_session_owners`` records as ended.

Rows the fence kept are reported by why, so the caller can tell an already-applied retry
(acknowledge it) from a Postgres that is ahead of Redis or holds another lineage (poison it)
and from a save into an ended run (leave it for the reconciler).
docs/persistence.md has the measurements that chose this shape over multi-row VALUES.

Rows become ``StoredSession`` records at one boundary (``_from_row``); what is written is a
``persistence.rows.SessionRow``, built from a record or straight from a Redis hash's bytes.
The upsert runs on a plain autocommit psycopg connection (``persistence.direct``): one
statement, one round trip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
import sqlalchemy as sa
from psycopg.types.array import ListBinaryDumper
from sqlalchemy.dialects.postgresql import ARRAY, INTERVAL
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.postgresql import psycopg as postgresql_psycopg
from sqlalchemy.engine import Connection, Engine, RowMapping, make_url
from sqlalchemy.sql.dml import ReturningInsert
from sqlalchemy.types import UserDefinedType

from cache.codec import WRITE_TEXT_FIELDS, decode_snapshot
from cache.errors import InvalidInput
from cache.records import (
    OWNER_ENDS,
    ClosedBy,
    OwnerType,
    RunRef,
    SessionKey,
    SessionStatus,
    SessionWrite,
    StoredSession,
    specs_from_list,
    unchecked,
)
from persistence.direct import DirectConnections
from persistence.errors import translate_errors
from persistence.models import KEY_COLUMNS, runs, sessions
from persistence.rows import COLUMNS, SessionRow, newest_per_key, row_of_session

_CONNECT_TIMEOUT_S: Final = 5
_KEYS: Final = {
    owner: tuple(sessions.c[name] for name in names) for owner, names in KEY_COLUMNS.items()
}
_OWNER_ID: Final = {
    OwnerType.WORKFLOW_RUN: sessions.c.workflow_run_id,
    OwnerType.CONVERSATION: sessions.c.conversation_id,
}
_KEY_ORDER: Final = (
    sessions.c.owner_type,
    sessions.c.tenant_id,
    sessions.c.workflow_run_id,
    sessions.c.conversation_id,
    sessions.c.node_id,
    sessions.c.binding_id,
    sessions.c.agent_id,
    sessions.c.agent_config_snapshot_id,
)
"""What a key is read back from (``_key_of``), in the order sessions are listed."""
_DATA_TEXT_COLUMNS: Final = WRITE_TEXT_FIELDS  # SessionWrite fields stored as-is, same names

Fenced = tuple[SessionKey, int, int]
"""``(key, stored_version, offered_version)`` of a row the version fence kept as it was."""
Diverged = tuple[SessionKey, int, str, int, str]
"""``(key, stored_version, stored_lineage, offered_version, offered_lineage)``."""
_OWNER_ENDS = sorted(closer.value for closer in OWNER_ENDS)
_ACTIVE = SessionStatus.ACTIVE.value


@dataclass(frozen=True, slots=True)
class RunEnd:
    """The durable record of an ended run."""

    outcome: str
    ended_at: datetime
    settled: bool


@dataclass(frozen=True, slots=True)
class UpsertResult:
    """What one ``upsert_fenced`` did: which versions landed and which the fence refused."""

    written: list[tuple[SessionKey, int]] = field(default_factory=list)
    fenced: list[Fenced] = field(default_factory=list)
    diverged: list[Diverged] = field(default_factory=list)
    """Postgres holds another lineage of the key: two histories, never merged silently."""
    run_ended: list[SessionKey] = field(default_factory=list)
    """``active`` rows of a run that ended: refused, left for the run's reconciliation."""

    @property
    def stale_equal(self) -> list[Fenced]:
        """Fenced rows Postgres already holds at the offered version: a retry, safe to ack."""
        return [entry for entry in self.fenced if entry[1] == entry[2]]

    @property
    def ahead(self) -> list[Fenced]:
        """Fenced rows where Postgres is ahead of Redis: never ack silently (poison them)."""
        return [entry for entry in self.fenced if entry[1] > entry[2]]


def create_engine(database_url: str, **kwargs: Any) -> Engine:
    """An engine for ``database_url``; plain ``postgresql://`` URLs get the psycopg 3 driver.

    ``pool_pre_ping`` makes a connection that died while idle (server restart between
    flushes) reconnect instead of failing the next flush; the connect timeout turns an
    unreachable server into ``PersistenceUnavailable`` quickly rather than hanging a worker.
    """
    url = make_url(database_url)
    if url.drivername in {"postgresql", "postgres"}:
        url = url.set(drivername="postgresql+psycopg")
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("connect_args", {"connect_timeout": _CONNECT_TIMEOUT_S})
    return sa.create_engine(url, **kwargs)


def _to_iso(value: datetime | None) -> str | None:
    """UTC ISO text in ``cache.clock.now_iso``'s format, microseconds only when present."""
    if value is None:
        return None
    spec = "milliseconds" if value.microsecond % 1000 == 0 else "microseconds"
    return value.astimezone(UTC).isoformat(timespec=spec)


def _from_row(row: RowMapping) -> StoredSession:
    """The one place a row becomes a record; a row in Postgres is by definition flushed."""
    data = unchecked(
        SessionWrite,
        snapshot=decode_snapshot(row["snapshot"]),
        layer_specs=specs_from_list(row["layer_specs"]),
        snapshot_from_wire=True,
        **{name: row[name] for name in _DATA_TEXT_COLUMNS},
    )
    return StoredSession(
        key=_key_of(row),
        status=SessionStatus(row["status"]),
        version=row["version"],
        flushed_version=row["version"],
        data=data,
        created_at=_to_iso(row["created_at"]),
        updated_at=_to_iso(row["updated_at"]),
        cleaned_at=_to_iso(row["cleaned_at"]),
        closed_by=ClosedBy(row["closed_by"]) if row["closed_by"] else None,
        cleanup_error=row["cleanup_error"],
        lineage=row["lineage"],
        snapshot_raw=row["snapshot"],
    )


def _key_of(row: RowMapping) -> SessionKey:
    owner = OwnerType(row["owner_type"])
    return SessionKey.of_parts(owner, *(row[name] for name in KEY_COLUMNS[owner]))


class _BinaryArray(list[Any]):
    """A column of a batch that psycopg sends as one binary array parameter.

    psycopg's default text format quotes and escapes every element (bytea as hex, twice
    the size); for 500 8 KB snapshots that made the flush 3x slower (docs/persistence.md).
    The dumper is registered for this private type only, so no other list changes format.
    """


psycopg.adapters.register_dumper(_BinaryArray, ListBinaryDumper)


class _ArrayParameter(UserDefinedType[list[Any]]):
    """A bind parameter SQLAlchemy passes through untouched (no processor, no ``::`` cast).

    SQLAlchemy's ``ARRAY`` type would rebuild the list and so lose :class:`_BinaryArray`;
    the SQL ``CAST`` around the parameter gives Postgres the column's array type instead.
    """

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "unknown[]"


def _array_parameter(name: str) -> sa.ColumnElement[Any]:
    """``CAST(:name AS <type>[])``; lengths are dropped, so an over-long value is refused.

    An explicit cast to ``varchar(255)`` would silently truncate; casting to ``varchar``
    leaves the check to the column, which rejects the row instead.
    """
    column_type = sessions.c[name].type
    if isinstance(column_type, sa.String):
        column_type = sa.String()
    return sa.cast(sa.bindparam(name, type_=_ArrayParameter()), ARRAY(column_type))


def _upsert_statement(owner: OwnerType) -> ReturningInsert[Any]:
    """The fenced upsert of a whole batch: one statement, one array parameter per column.

    ``INSERT ... SELECT FROM unnest(<arrays>)`` rather than ``VALUES (...) x N``: its SQL is
    the same for every batch, so SQLAlchemy compiles it once instead of building 21 x N
    bind parameters per flush (the cost that made ``VALUES`` the slowest shape measured),
    and no batch size can reach Postgres' 65,535-parameter limit. It returns the key and
    version of each row it wrote; rows the fence kept return nothing.

    One statement per owner type: each owner's key has its own unique constraint, and one
    ``ON CONFLICT`` names one of them.
    """
    arrays = [_array_parameter(name) for name in COLUMNS]
    source = sa.func.unnest(*arrays).table_valued(*COLUMNS).render_derived()
    ended = sa.exists().where(
        runs.c.tenant_id == source.c.tenant_id,
        runs.c.owner_type == owner.value,
        runs.c.owner_id == source.c[_OWNER_ID[owner].name],
    )
    rows = sa.select(*(source.c[name] for name in COLUMNS)).where(
        sa.or_(source.c.status != _ACTIVE, ~ended)
    )
    insert = pg_insert(sessions).from_select(list(COLUMNS), rows)
    keys = KEY_COLUMNS[owner]
    updated = {name: insert.excluded[name] for name in COLUMNS if name not in keys}
    new = insert.excluded
    return insert.on_conflict_do_update(
        index_elements=list(_KEYS[owner]),
        set_={**updated, "flushed_at": sa.func.now()},
        where=sa.and_(
            sessions.c.version < new.version,
            sa.or_(
                sessions.c.lineage.is_(None),
                new.lineage.is_(None),
                sessions.c.lineage == new.lineage,
            ),
            sa.or_(
                new.status != _ACTIVE,
                sessions.c.closed_by.is_(None),
                sa.and_(*(sessions.c.closed_by != closer for closer in _OWNER_ENDS)),
            ),
        ),
    ).returning(*_KEYS[owner], sessions.c.version)


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One owner's upsert as psycopg SQL and its constant parameters, compiled once."""

    sql: bytes
    constants: dict[str, Any]

    @classmethod
    def of(cls, owner: OwnerType) -> _Compiled:
        compiled = _upsert_statement(owner).compile(dialect=postgresql_psycopg.dialect())  # type: ignore[no-untyped-call]
        constants = {k: v for k, v in compiled.params.items() if k not in COLUMNS}
        return cls(str(compiled).encode(), constants)

    def params(self, rows: Sequence[SessionRow]) -> dict[str, Any]:
        """One binary array per column, column-major."""
        columns = zip(*(row.values for row in rows), strict=True)
        arrays = dict(zip(COLUMNS, map(_BinaryArray, columns), strict=True))
        return {**self.constants, **arrays}


_UPSERTS: Final = {owner: _Compiled.of(owner) for owner in OwnerType}


class SessionRepository:
    """Reads and fenced writes of the sessions table; every call is one short transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._direct = DirectConnections(engine.url, connect_timeout_s=_CONNECT_TIMEOUT_S)

    def close(self) -> None:
        """Close the flush's direct connections and dispose the engine's pool."""
        self._direct.close()
        self.engine.dispose()

    def upsert_fenced(self, batch: Sequence[StoredSession]) -> UpsertResult:
        """:meth:`upsert_rows` of records."""
        now = datetime.now(UTC)
        return self.upsert_rows([row_of_session(session, now) for session in batch])

    def upsert_rows(self, batch: Sequence[SessionRow], *, direct: bool = True) -> UpsertResult:
        """Write ``batch`` where it is newer than Postgres: one statement per owner type in
        it (each all or nothing; a batch of one owner type is one statement).

        ``direct``: on this thread's own autocommit connection (flusher threads: few, long
        lived); otherwise on a connection of the engine's bounded pool (a durable pause from
        any of an application's threads).
        Raises ``RowRejected`` if Postgres refuses any row (nothing of that owner type's
        statement is written, though an earlier owner type's may be: the caller isolates the
        row by splitting, and the rows already written come back fenced at their own version,
        which acknowledges them) and ``PersistenceUnavailable`` when it cannot be reached.
        Duplicate keys collapse to their highest version; each key is reported once.
        """
        offered = newest_per_key(batch)
        if not offered:
            return UpsertResult()
        written: dict[SessionKey, int] = {}
        for owner in OwnerType:
            rows = [row for row in offered if row.key.owner_type is owner]
            if not rows:
                continue
            upsert = _UPSERTS[owner]
            with translate_errors():
                if direct:
                    replies = self._direct.execute(upsert.sql, upsert.params(rows))
                else:
                    replies = self._pooled_upsert(upsert.sql, upsert.params(rows))
            keys = {row.key.parts(): row.key for row in rows}
            written |= {keys[tuple(reply[:5])]: reply[5] for reply in replies}
        refused = [row for row in offered if row.key not in written]
        if refused:
            with translate_errors(), self.engine.connect() as conn:
                result = _Refusals(refused, *self._refused_state(conn, refused)).result()
        else:
            result = UpsertResult()
        return dataclasses.replace(result, written=sorted(written.items(), key=_by_key))

    def _pooled_upsert(self, sql: bytes, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        with self.engine.begin() as conn:
            result = conn.exec_driver_sql(sql.decode(), params)
            return [tuple(row) for row in result]

    @staticmethod
    def _refused_state(
        conn: Connection, refused: list[SessionRow]
    ) -> tuple[dict[SessionKey, RowMapping], set[RunRef]]:
        """What Postgres holds for the rows the fence kept: their stored version, lineage and
        ``closed_by``, and which of their owners ended (a SELECT per owner type, and one)."""
        stored: dict[SessionKey, RowMapping] = {}
        for owner in OwnerType:
            parts = [row.key.parts() for row in refused if row.key.owner_type is owner]
            if not parts:
                continue
            query = sa.select(
                *_KEY_ORDER, sessions.c.version, sessions.c.lineage, sessions.c.closed_by
            ).where(sessions.c.owner_type == owner.value, sa.tuple_(*_KEYS[owner]).in_(parts))
            stored |= {_key_of(row): row for row in conn.execute(query).mappings()}
        owner_ids = sorted({_owner_row(row.key.owner) for row in refused})
        ended_query = sa.select(*_OWNER_ROW).where(sa.tuple_(*_OWNER_ROW).in_(owner_ids))
        ended = {_owner_of(row) for row in conn.execute(ended_query).all()}
        return stored, ended

    # --- ended runs --------------------------------------------------------------------------

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
            "tenant_id": run.tenant_id,
            "owner_type": run.owner_type.value,
            "owner_id": run.owner_id,
            "outcome": outcome,
            "ended_at": sa.func.now(),
            "next_check_at": sa.func.now() + _seconds(check_after_s),
        }
        insert = pg_insert(runs).values(values).on_conflict_do_nothing().returning(runs.c.outcome)
        with translate_errors(), self.engine.begin() as conn:
            inserted = conn.execute(insert).one_or_none() is not None
            found = _run_end(conn, run)
        assert found is not None, "a row this transaction inserted or found"
        return found, inserted

    def run_end(self, run: RunRef) -> RunEnd | None:
        """The durable record of ``run``'s end, or ``None`` if it has not ended."""
        with translate_errors(), self.engine.connect() as conn:
            return _run_end(conn, run)

    def claim_due_runs(self, *, limit: int, recheck_after_s: float) -> list[RunRef]:
        """Up to ``limit`` unsettled ended runs due for a visit, pushed ``recheck_after_s``
        into the future in the same statement (so concurrent reconcilers share the work)."""
        due = (
            sa.select(*_OWNER_ROW)
            .where(runs.c.settled_at.is_(None), runs.c.next_check_at <= sa.func.now())
            .order_by(runs.c.next_check_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).subquery()
        claim = (
            sa.update(runs)
            .where(
                runs.c.tenant_id == due.c.tenant_id,
                runs.c.owner_type == due.c.owner_type,
                runs.c.owner_id == due.c.owner_id,
            )
            .values(next_check_at=sa.func.now() + _seconds(recheck_after_s))
            .returning(*_OWNER_ROW)
        )
        with translate_errors(), self.engine.begin() as conn:
            return [_owner_of(row) for row in conn.execute(claim).all()]

    def settle_run(self, run: RunRef) -> None:
        """Every session of the ended run is cleaned: the reconciler stops visiting it."""
        self._update_run(run, settled_at=sa.func.now())

    def recheck_runs(self, refs: Iterable[RunRef]) -> None:
        """Have the reconciler visit these ended runs now (a flush met a save it refused)."""
        for run in set(refs):
            self._update_run(run, settled_at=None, next_check_at=sa.func.now())

    def _update_run(self, run: RunRef, **values: Any) -> None:
        query = sa.update(runs).where(*_is_owner(run)).values(**values)
        with translate_errors(), self.engine.begin() as conn:
            conn.execute(query)

    def count_unsettled_runs(self) -> int:
        """Ended runs not settled yet (operators' ``stats``: the reconciler's backlog)."""
        query = sa.select(sa.func.count()).select_from(runs).where(runs.c.settled_at.is_(None))
        with translate_errors(), self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def unsettled_keys(self, run: RunRef) -> list[SessionKey]:
        """Keys of the owner's rows that are not ``cleaned`` yet (no snapshots are read)."""
        query = (
            sa.select(*_KEY_ORDER)
            .where(*_of_owner(run), sessions.c.status != SessionStatus.CLEANED.value)
            .order_by(*_KEY_ORDER)
        )
        with translate_errors(), self.engine.connect() as conn:
            return [_key_of(row) for row in conn.execute(query).mappings()]

    # --- sessions ----------------------------------------------------------------------------

    def get_with_run(self, key: SessionKey) -> tuple[StoredSession | None, RunEnd | None]:
        """The stored session of ``key`` and its run's end record, on one connection."""
        run = key.owner
        with translate_errors(), self.engine.connect() as conn:
            row = conn.execute(_by_key_query(key)).mappings().one_or_none()
            return (None if row is None else _from_row(row)), _run_end(conn, run)

    def get(self, key: SessionKey) -> StoredSession | None:
        """The stored session of ``key`` in any status (read-through fills Redis with it)."""
        with translate_errors(), self.engine.connect() as conn:
            row = conn.execute(_by_key_query(key)).mappings().one_or_none()
        return None if row is None else _from_row(row)

    def list_run(
        self, tenant_id: str, workflow_run_id: str, status: SessionStatus | None = None
    ) -> list[StoredSession]:
        """Every session of one workflow run of one tenant, optionally of one status."""
        return self.list_owner(RunRef(tenant_id, workflow_run_id), status)

    def list_owner(self, owner: RunRef, status: SessionStatus | None = None) -> list[StoredSession]:
        """Every session of one owner, optionally of one status, in key order."""
        query = sa.select(sessions).where(*_of_owner(owner))
        if status is not None:
            query = query.where(sessions.c.status == SessionStatus(status).value)
        return self._rows(query.order_by(*_KEY_ORDER))

    def list_keys(self, owner: RunRef, status: SessionStatus) -> list[SessionKey]:
        """The keys (only) of one owner's sessions of one status: no snapshots are read."""
        query = (
            sa.select(*_KEY_ORDER)
            .where(*_of_owner(owner), sessions.c.status == SessionStatus(status).value)
            .order_by(*_KEY_ORDER)
        )
        with translate_errors(), self.engine.connect() as conn:
            return [_key_of(row) for row in conn.execute(query).mappings()]

    def other_active_configs(self, key: SessionKey) -> list[SessionKey]:
        """A conversation's ``active`` sessions of the same binding and agent under another
        config snapshot (a turn with ``key``'s config retires them)."""
        if key.owner_type is not OwnerType.CONVERSATION:
            return []
        query = sa.select(*_KEY_ORDER).where(
            *_of_owner(key.owner),
            sessions.c.binding_id == key.binding_id,
            sessions.c.agent_id == key.agent_id,
            sessions.c.agent_config_snapshot_id != key.config_id,
            sessions.c.status == _ACTIVE,
        )
        with translate_errors(), self.engine.connect() as conn:
            return [_key_of(row) for row in conn.execute(query).mappings()]

    def idle_conversation_keys(self, *, idle_s: float, limit: int) -> list[SessionKey]:
        """Up to ``limit`` ``active`` conversation sessions not updated for ``idle_s`` seconds
        and not waiting for human input, oldest first, of conversations that have not ended
        (an ended one's are the reconciler's)."""
        query = (
            sa.select(*_KEY_ORDER)
            .where(
                sessions.c.owner_type == OwnerType.CONVERSATION.value,
                sessions.c.status == _ACTIVE,
                sessions.c.updated_at < sa.func.now() - _seconds(idle_s),
                sessions.c.pending_form_id.is_(None),
                sessions.c.pending_tool_call_id.is_(None),
                ~_conversation_ended(),
            )
            .order_by(sessions.c.updated_at)
            .limit(limit)
        )
        with translate_errors(), self.engine.connect() as conn:
            return [_key_of(row) for row in conn.execute(query).mappings()]

    def stalled_conversation_cleanups(self, *, older_than_s: float, limit: int) -> list[SessionKey]:
        """Up to ``limit`` conversation sessions ``cleaning`` for over ``older_than_s`` seconds
        in conversations that have not ended (an ended one's are the reconciler's)."""
        query = (
            sa.select(*_KEY_ORDER)
            .where(
                sessions.c.owner_type == OwnerType.CONVERSATION.value,
                sessions.c.status == SessionStatus.CLEANING.value,
                sessions.c.updated_at < sa.func.now() - _seconds(older_than_s),
                ~_conversation_ended(),
            )
            .order_by(sessions.c.updated_at)
            .limit(limit)
        )
        with translate_errors(), self.engine.connect() as conn:
            return [_key_of(row) for row in conn.execute(query).mappings()]

    def count_cleanup_failures(self) -> int:
        """How many sessions' cleanups gave up (``cleaned`` with an error)."""
        query = sa.select(sa.func.count()).where(
            sessions.c.status == "cleaned", sessions.c.cleanup_error.is_not(None)
        )
        with translate_errors(), self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def count_rows(self) -> int:
        """How many sessions Postgres holds (CLI ``stats`` and tests)."""
        with translate_errors(), self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(sessions)).scalar_one())

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

    def _rows(self, query: sa.Select[Any]) -> list[StoredSession]:
        """Run a read of whole rows and convert each at the one boundary."""
        with translate_errors(), self.engine.connect() as conn:
            return [_from_row(row) for row in conn.execute(query).mappings().all()]


def _by_key_query(key: SessionKey) -> sa.Select[Any]:
    keys = _KEYS[key.owner_type]
    return sa.select(sessions).where(
        sessions.c.owner_type == key.owner_type.value,
        *(col == part for col, part in zip(keys, key.parts(), strict=True)),
    )


def _of_owner(owner: RunRef) -> tuple[sa.ColumnElement[bool], ...]:
    """The sessions table's rows of ``owner``."""
    return (
        sessions.c.owner_type == owner.owner_type.value,
        sessions.c.tenant_id == owner.tenant_id,
        _OWNER_ID[owner.owner_type] == owner.owner_id,
    )


def _conversation_ended() -> sa.Exists:
    """The session row's conversation has ended (a row in the owners table)."""
    return sa.exists().where(
        runs.c.tenant_id == sessions.c.tenant_id,
        runs.c.owner_type == OwnerType.CONVERSATION.value,
        runs.c.owner_id == sessions.c.conversation_id,
    )


_OWNER_ROW: Final = (runs.c.tenant_id, runs.c.owner_type, runs.c.owner_id)


def _is_owner(owner: RunRef) -> tuple[sa.ColumnElement[bool], ...]:
    """The owners table's row of ``owner``."""
    return tuple(col == value for col, value in zip(_OWNER_ROW, _owner_row(owner), strict=True))


def _owner_row(owner: RunRef) -> tuple[str, str, str]:
    return (owner.tenant_id, owner.owner_type.value, owner.owner_id)


def _owner_of(row: Any) -> RunRef:
    tenant_id, owner_type, owner_id = row
    return RunRef(tenant_id, owner_id, OwnerType(owner_type))


def _seconds(seconds: float) -> sa.ColumnElement[Any]:
    return sa.cast(sa.literal(f"{seconds} seconds"), INTERVAL)


def _run_end(conn: Connection, run: RunRef) -> RunEnd | None:
    query = sa.select(runs.c.outcome, runs.c.ended_at, runs.c.settled_at).where(*_is_owner(run))
    row = conn.execute(query).one_or_none()
    return None if row is None else RunEnd(row.outcome, row.ended_at, row.settled_at is not None)


def _by_key(entry: tuple[SessionKey, int]) -> tuple[str, ...]:
    return entry[0].sort_key()


@dataclass(frozen=True, slots=True)
class _Refusals:
    """Sorts the rows the fence kept by why it kept them."""

    refused: list[SessionRow]
    stored: Mapping[SessionKey, RowMapping]
    ended_runs: set[RunRef]

    def result(self) -> UpsertResult:
        result = UpsertResult()
        for offered in self.refused:
            self._sort(offered, result)
        return result

    def _sort(self, offered: SessionRow, result: UpsertResult) -> None:
        """A row that vanished in between (nothing in this project deletes rows) is in no
        list, so the caller leaves it dirty and the next flush inserts it."""
        key, row = offered.key, self.stored.get(offered.key)
        if offered.status == _ACTIVE and (
            key.owner in self.ended_runs or (row is not None and row["closed_by"] in _OWNER_ENDS)
        ):
            result.run_ended.append(key)
        elif row is None:
            return
        elif row["lineage"] and offered.lineage and row["lineage"] != offered.lineage:
            lineages = (row["lineage"], offered.version, offered.lineage)
            result.diverged.append((key, row["version"], *lineages))
        else:
            result.fenced.append((key, row["version"], offered.version))
