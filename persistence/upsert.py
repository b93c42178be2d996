"""The flush's fenced batch upsert (DESIGN §5.3): one statement per owner type in a batch.

Up to ``flush_batch`` sessions go in ONE ``INSERT ... SELECT FROM unnest(...) ON CONFLICT
(key) DO UPDATE ... WHERE <fence>`` statement. The fence:

* ``stored.version < excluded.version``: a retried, duplicated or out-of-order flush can
  never move a row backwards;
* the same lineage (or either unknown): equal versions of two histories of one key are
  never taken for each other;
* never ``active`` again once the workflow's end closed the row, and never an ``active``
  row for a run ``agent_session_owners`` records as ended;
* never a row whose Redis copy knows less than Postgres holds (Redis went back in time: a
  failover, a restore): Postgres's version must not exceed the copy's ``known_version``;
* of one deployment (``key_prefix``) only.

Rows the fence kept are reported by why, so the caller can tell an already-applied retry
(the same version and content: acknowledge it) from a Postgres that is ahead of Redis or
holds another history of the key (another lineage, another save at the same version, or
more than the copy knows reached it: poison it, both sides named) and from a save into an
ended run (leave it for the reconciler). docs/persistence.md has the
measurements that chose this shape over multi-row VALUES. The statement runs on a plain
autocommit psycopg connection (``persistence.direct``): one statement, one round trip.

The statement SQLAlchemy compiles once per owner type, for a workflow run's rows
(``tests/unit/test_upsert_sql.py`` checks the fence below against the compiled text)::

    INSERT INTO agent_runtime_sessions (key_prefix, <COLUMNS>)
    SELECT %(key_prefix)s::VARCHAR, <COLUMNS>
      FROM unnest(CAST(%(owner_type)s AS VARCHAR[]), ..., CAST(%(known_version)s AS BIGINT[]))
           AS batch(<COLUMNS>, known_version)
     WHERE (batch.status != 'active' OR NOT (EXISTS (SELECT * FROM agent_session_owners
             WHERE agent_session_owners.key_prefix = %(key_prefix)s::VARCHAR
               AND agent_session_owners.tenant_id = batch.tenant_id
               AND agent_session_owners.owner_type = 'workflow_run'
               AND agent_session_owners.owner_id = batch.workflow_run_id)))
       AND (batch.known_version IS NULL OR coalesce((SELECT stored.version
             FROM agent_runtime_sessions AS stored
             WHERE stored.key_prefix = %(key_prefix)s::VARCHAR
               AND stored.tenant_id = batch.tenant_id
               AND stored.workflow_run_id = batch.workflow_run_id
               AND stored.node_id = batch.node_id AND stored.binding_id = batch.binding_id
               AND stored.agent_id = batch.agent_id), 0) <= batch.known_version)
    ON CONFLICT (key_prefix, tenant_id, workflow_run_id, node_id, binding_id, agent_id)
       WHERE workflow_run_id IS NOT NULL DO UPDATE
       SET <every other column> = excluded.<column>, flushed_at = now()
     WHERE agent_runtime_sessions.version < excluded.version
       AND (agent_runtime_sessions.lineage IS NULL OR excluded.lineage IS NULL
            OR agent_runtime_sessions.lineage = excluded.lineage)
       AND (excluded.status != 'active' OR agent_runtime_sessions.closed_by IS NULL
            OR agent_runtime_sessions.closed_by != 'conversation_end'
               AND agent_runtime_sessions.closed_by != 'workflow_end')
    RETURNING <the key columns>, agent_runtime_sessions.version

``<COLUMNS>`` is ``persistence.rows.COLUMNS``; a conversation's statement names its own key
columns (``conversation_id`` and ``agent_config_snapshot_id`` for ``workflow_run_id`` and
``node_id``) and its own partial unique index (``conversation_id IS NOT NULL``). The last
condition is the fence against a Redis that went back in time: ``known_version`` is the
highest version the row's Redis copy knows reached Postgres (``lua/mark_flushing.lua``; NULL
for a copy an earlier build saved, which is not checked). It is a scalar subquery: written as
``NOT EXISTS``, Postgres planned it on a fresh table as an anti join over every row of the
prefix (``EXPLAIN ANALYZE``: 21.8 ms for 20 rows among 3,000, 1.2 ms after ``ANALYZE``). The
lookup can only be planned on the owner's own indexes, which are partial
(``persistence.models.OWNER_ROWS``): so it reads at most one owner's rows whatever the
statistics (without any, with one index per key shared by both owners, Postgres looked it up
through the conversation index by ``(key_prefix, tenant_id)``: 0.87 ms per row among
20,000; ``tests/integration/test_upsert_plan.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import psycopg
import sqlalchemy as sa
from psycopg.types.array import ListBinaryDumper
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.postgresql import psycopg as postgresql_psycopg
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.sql.dml import ReturningInsert
from sqlalchemy.types import UserDefinedType

from cache.records import Owner, OwnerType, SessionKey
from persistence.direct import DirectConnections
from persistence.errors import translate_errors
from persistence.models import KEY_COLUMNS, OWNER_ROWS, UNIQUE_COLUMNS, owners, sessions
from persistence.rows import COLUMNS, SessionRow, newest_per_key
from persistence.selects import (
    ACTIVE,
    KEY_ORDER,
    KEYS,
    OWNER_CLOSERS,
    OWNER_ID,
    OWNER_ROW,
    key_of,
    owner_of,
    owner_row,
)

Fenced = tuple[SessionKey, int, int]
"""``(key, stored_version, offered_version)`` of a row the version fence kept as it was."""


@dataclass(frozen=True, slots=True)
class Divergence:
    """Postgres holds a state of the key this Redis copy does not descend from (another
    lineage, another save at the same version, or more than this copy knows reached
    Postgres: Redis went back in time). Never written, never acknowledged: parked in the
    poison hash with ``why``, which names both sides."""

    key: SessionKey
    offered_version: int
    why: str


@dataclass(frozen=True, slots=True)
class UpsertResult:
    """What one ``upsert_rows`` did: which versions landed and which the fence refused."""

    written: list[tuple[SessionKey, int]] = field(default_factory=list)
    fenced: list[Fenced] = field(default_factory=list)
    diverged: list[Divergence] = field(default_factory=list)
    """Two histories of the key, never merged silently."""
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
    version of each row it wrote; rows the fence kept return nothing. The deployment's
    prefix is one scalar parameter; ``known_version`` (per row) only filters.

    One statement per owner type: each owner's key has its own partial unique index, and one
    ``ON CONFLICT`` names one of them (its columns and its predicate).
    """
    prefix = sa.bindparam("key_prefix", type_=sa.String())
    insert = pg_insert(sessions).from_select(["key_prefix", *COLUMNS], _fenced_rows(owner, prefix))
    keys = KEY_COLUMNS[owner]
    updated = {name: insert.excluded[name] for name in COLUMNS if name not in keys}
    return insert.on_conflict_do_update(
        index_elements=list(UNIQUE_COLUMNS[owner]),
        index_where=sa.text(OWNER_ROWS[owner]),
        set_={**updated, "flushed_at": sa.func.now()},
        where=_may_replace(insert.excluded),
    ).returning(*KEYS[owner], sessions.c.version)


def _fenced_rows(owner: OwnerType, prefix: sa.BindParameter[Any]) -> sa.Select[Any]:
    """The batch's rows that may be written at all: not an ``active`` row of an ended owner,
    and not a row whose stored version its Redis copy never knew reached Postgres."""
    arrays = [_array_parameter(name) for name in COLUMNS]
    known = sa.cast(sa.bindparam("known_version", type_=_ArrayParameter()), ARRAY(sa.BigInteger()))
    source = sa.func.unnest(*arrays, known).table_valued(*COLUMNS, "known_version")
    batch = source.render_derived(name="batch")
    ended = sa.exists().where(
        owners.c.key_prefix == prefix,
        owners.c.tenant_id == batch.c.tenant_id,
        owners.c.owner_type == owner.value,
        owners.c.owner_id == batch.c[OWNER_ID[owner].name],
    )
    # A scalar subquery, not NOT EXISTS: Postgres may turn NOT EXISTS into an anti join, and
    # on a table without statistics yet (a fresh one, a bulk load) it scanned every row of
    # the prefix for each row of the batch (21.8 ms against 1.2 ms for 20 rows of 3,000).
    # Its equality on the owner's id restricts it to the owner's partial indexes.
    stored = sessions.alias("stored")
    stored_version = (
        sa.select(stored.c.version)
        .where(
            stored.c.key_prefix == prefix,
            *(stored.c[name] == batch.c[name] for name in KEY_COLUMNS[owner]),
        )
        .scalar_subquery()
    )
    within_known = sa.or_(
        batch.c.known_version.is_(None),
        sa.func.coalesce(stored_version, sa.literal_column("0")) <= batch.c.known_version,
    )
    return sa.select(prefix, *(batch.c[name] for name in COLUMNS)).where(
        sa.or_(batch.c.status != ACTIVE, ~ended), within_known
    )


def _may_replace(new: Any) -> sa.ColumnElement[bool]:
    """When an offered row replaces the stored one: a higher version of the same lineage, and
    never an ``active`` row over one its owner's end closed."""
    return sa.and_(
        sessions.c.version < new.version,
        sa.or_(
            sessions.c.lineage.is_(None),
            new.lineage.is_(None),
            sessions.c.lineage == new.lineage,
        ),
        sa.or_(
            new.status != ACTIVE,
            sessions.c.closed_by.is_(None),
            sa.and_(*(sessions.c.closed_by != closer for closer in OWNER_CLOSERS)),
        ),
    )


_PER_CALL: Final = frozenset({*COLUMNS, "known_version", "key_prefix"})
"""The statement's parameters that change with every call (the rest are constants)."""


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One owner's upsert and its constant parameters, compiled once: as psycopg SQL (for a
    SQLAlchemy connection) and with ``$n`` placeholders (for the flusher's own)."""

    sql: bytes
    constants: dict[str, Any]
    raw_sql: bytes
    order: tuple[str, ...]

    @classmethod
    def of(cls, owner: OwnerType) -> _Compiled:
        statement = _upsert_statement(owner)
        compiled = statement.compile(dialect=postgresql_psycopg.dialect())  # type: ignore[no-untyped-call]
        constants = {k: v for k, v in compiled.params.items() if k not in _PER_CALL}
        numbered = statement.compile(dialect=_NUMBERED)
        order = tuple(numbered.positiontup or ())
        return cls(str(compiled).encode(), constants, str(numbered).encode(), order)

    def params(self, rows: Sequence[SessionRow], key_prefix: str) -> dict[str, Any]:
        """One binary array per column, column-major, and the deployment's prefix."""
        columns = zip(*(row.values for row in rows), strict=True)
        arrays = dict(zip(COLUMNS, map(_BinaryArray, columns), strict=True))
        known = _BinaryArray(row.known_version for row in rows)
        return {**self.constants, **arrays, "known_version": known, "key_prefix": key_prefix}

    def raw_params(self, named: dict[str, Any]) -> list[Any]:
        """:meth:`params` in ``raw_sql``'s ``$n`` order."""
        return [named[name] for name in self.order]


_NUMBERED: Final = postgresql_psycopg.dialect(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]
"""The dialect compiling the flusher's form: Postgres' own ``$n`` placeholders, one per name.

psycopg converts a ``%(name)s`` query on every execution and caches the conversion only for
queries up to 4,096 bytes: the upsert is longer, so each flush paid 64 µs to parse it again.
In this form a ``psycopg.RawCursor`` sends it as it is."""
_UPSERTS: Final = {owner: _Compiled.of(owner) for owner in OwnerType}


class FencedUpsert:
    """The flush's side of :class:`persistence.repository.SessionRepository` (a mixin)."""

    if TYPE_CHECKING:
        engine: Engine
        key_prefix: str
        _direct: DirectConnections

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
            params = upsert.params(rows, self.key_prefix)
            with translate_errors():
                if direct:
                    replies = self._direct.execute(upsert.raw_sql, upsert.raw_params(params))
                else:
                    replies = self._pooled_upsert(upsert.sql, params)
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

    def _refused_state(
        self, conn: Connection, refused: list[SessionRow]
    ) -> tuple[dict[SessionKey, RowMapping], set[Owner]]:
        """What Postgres holds for the rows the fence kept: their stored version, lineage,
        content and ``closed_by``, and which of their owners ended (a SELECT per owner type,
        and one), in this deployment."""
        stored: dict[SessionKey, RowMapping] = {}
        for owner in OwnerType:
            parts = [row.key.parts() for row in refused if row.key.owner_type is owner]
            if not parts:
                continue
            query = sa.select(*KEY_ORDER, *_STORED).where(
                sessions.c.key_prefix == self.key_prefix,
                sessions.c.owner_type == owner.value,
                sa.tuple_(*KEYS[owner]).in_(parts),
            )
            stored |= {key_of(row): row for row in conn.execute(query).mappings()}
        owner_ids = sorted({owner_row(self.key_prefix, row.key.owner) for row in refused})
        ended_query = sa.select(*OWNER_ROW).where(sa.tuple_(*OWNER_ROW).in_(owner_ids))
        ended = {owner_of(row) for row in conn.execute(ended_query).all()}
        return stored, ended


_STORED: Final = (
    sessions.c.version,
    sessions.c.lineage,
    sessions.c.content_id,
    sessions.c.closed_by,
)


def _by_key(entry: tuple[SessionKey, int]) -> tuple[str, ...]:
    return entry[0].sort_key()


@dataclass(frozen=True, slots=True)
class _Refusals:
    """Sorts the rows the fence kept by why it kept them."""

    refused: list[SessionRow]
    stored: Mapping[SessionKey, RowMapping]
    ended_runs: set[Owner]

    def result(self) -> UpsertResult:
        result = UpsertResult()
        for offered in self.refused:
            self._sort(offered, result)
        return result

    def _sort(self, offered: SessionRow, result: UpsertResult) -> None:
        """A row that vanished in between (nothing in this project deletes rows) is in no
        list, so the caller leaves it dirty and the next flush inserts it."""
        key, row = offered.key, self.stored.get(offered.key)
        if offered.status == ACTIVE and (
            key.owner in self.ended_runs or (row is not None and row["closed_by"] in OWNER_CLOSERS)
        ):
            result.run_ended.append(key)
        elif row is None:
            return
        elif (why := _divergence(row, offered)) is not None:
            result.diverged.append(Divergence(key, offered.version, why))
        else:
            result.fenced.append((key, row["version"], offered.version))


def _divergence(row: RowMapping, offered: SessionRow) -> str | None:
    """Why Postgres's row is not in the history of the offered one, or ``None`` (then the
    row is fenced: already applied, or Postgres is ahead). A lineage or content id unknown
    on either side (written by an earlier build) matches any."""
    stored, version, known = row["version"], offered.version, offered.known_version
    if row["lineage"] and offered.lineage and row["lineage"] != offered.lineage:
        return (
            f"diverged lineage: postgres holds lineage {row['lineage']} at version {stored}, "
            f"redis holds lineage {offered.lineage} at version {version}"
        )
    if stored == version and _differ(row["content_id"], offered.content_id):
        return (
            f"same version, other content: postgres holds version {stored} as content "
            f"{row['content_id']}, redis holds it as content {offered.content_id}"
        )
    if known is not None and known < stored < version:
        return (
            f"redis went back in time: postgres holds version {stored} "
            f"(content {row['content_id'] or '-'}), but this redis copy knows only up to "
            f"version {known} reached postgres; it holds version {version} "
            f"(content {offered.content_id or '-'}), built on an older state"
        )
    return None


def _differ(stored: str | None, offered: str | None) -> bool:
    return bool(stored and offered and stored != offered)
