"""Measure the flush upsert shapes and the snapshot TOAST compression (docs/persistence.md).

A plain script, not part of any package API. It creates a scratch database on the server of
``--url`` (default: DATABASE_URL's server, else 127.0.0.1:5432), migrates it with
``persistence.migrate``, and drops it at the end.

Per rep: TRUNCATE + CHECKPOINT, seed 250 rows, then 20 batches of 500 sessions (~8 KB msgpack
snapshots): 250 updates of the previous batch's new keys (version + 1) and 250 inserts. Every
shape starts from the same ``StoredSession`` objects, so encoding is inside the timing, and
every shape keeps the fence and reports what it wrote:

  values       one INSERT ... VALUES (...) x500 ON CONFLICT ... WHERE ... RETURNING,
               built with SQLAlchemy Core ``insert().values(rows)``
  values-raw   the same statement text prebuilt once, sent by a psycopg ``RawCursor``
               ($n placeholders): the server-side cost of the VALUES shape, no client compile
  executemany  psycopg ``executemany(..., returning=True)`` of the one-row statement
               (pipelined by psycopg 3: 500 statements in one round trip, not one statement)
  unnest       one INSERT ... SELECT FROM unnest(<21 array parameters>) ON CONFLICT ...
               (``SessionRepository.upsert_rows``, the shipped code path)
  unnest-raw   the same via psycopg with binary (%b) parameters, no SQLAlchemy

Run:  .venv/bin/python scripts/measure_storage.py [--reps 3] [--url postgresql://...]
"""

# ruff: noqa: S608  (every SQL string here is built from module constants, never from input)
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.types.json import Jsonb
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine, make_url

from cache.clock import now_iso
from cache.codec import pack
from cache.records import (
    LayerSpec,
    LifecycleState,
    OwnerType,
    SessionKey,
    SessionStatus,
    SessionWrite,
    Snapshot,
    SnapshotLayer,
    StoredSession,
)
from persistence import migrate
from persistence.engine import create_engine
from persistence.models import KEY_COLUMNS, OWNER_ROWS, TABLE_NAME, UNIQUE_COLUMNS, sessions
from persistence.repository import SessionRepository
from persistence.rows import COLUMNS as ROW_COLUMNS
from persistence.rows import SessionRow, row_of_session

BATCH = 500
BATCHES = 20
WORDS = [f"{a}{b}" for a in ("lo", "ra", "mi", "ten", "sul", "pra", "ke") for b in range(70)]
COLUMNS = [c.name for c in sessions.columns if c.name not in {"id", "flushed_at"}]
"""Every column the flush writes, in table order (as ``SessionRepository`` derives it)."""
_ARRAY_TYPES: dict[type[Any], str] = {
    sa.BigInteger: "bigint",
    sa.LargeBinary: "bytea",
    sa.JSON: "jsonb",
    sa.DateTime: "timestamptz",
    sa.String: "text",
}
ARRAY_TYPES = [
    next(name for kind, name in _ARRAY_TYPES.items() if isinstance(sessions.c[c].type, kind))
    for c in COLUMNS
]
"""Each column's array type, in ``COLUMNS`` order (derived, so it follows the table)."""
WORKFLOW_KEYS = KEY_COLUMNS[OwnerType.WORKFLOW_RUN]
KEYS = ", ".join(WORKFLOW_KEYS)
UNIQUE = ", ".join(UNIQUE_COLUMNS[OwnerType.WORKFLOW_RUN])
WORKFLOW_ROWS = OWNER_ROWS[OwnerType.WORKFLOW_RUN]
PREFIX = "asc"
UPDATE_SET = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS) + ", flushed_at = now()"
TAIL = (
    f"ON CONFLICT ({UNIQUE}) WHERE {WORKFLOW_ROWS} DO UPDATE SET {UPDATE_SET} "
    f"WHERE {TABLE_NAME}.version < excluded.version RETURNING {KEYS}, version"
)
ONE_ROW_SQL = (
    f"INSERT INTO {TABLE_NAME} ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join(f'%({c})s' for c in COLUMNS)}) {TAIL}"
)
UNNEST_SQL = (
    f"INSERT INTO {TABLE_NAME} ({', '.join(COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"%b::{t}[]" for t in ARRAY_TYPES)
    + f") {TAIL}"
)


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def snapshot(rng: random.Random) -> Snapshot:
    """~8 KB of msgpack: 4 layers, a 21-message history (like the baseline's snapshot)."""
    messages = [
        {"role": rng.choice(["user", "assistant", "tool"]), "content": sentence(rng, 62)}
        for _ in range(21)
    ]
    layers = [
        SnapshotLayer("history", LifecycleState.SUSPENDED, {"messages": messages}),
        SnapshotLayer("memory", LifecycleState.SUSPENDED, {"notes": [sentence(rng, 30)] * 2}),
        SnapshotLayer("planner", LifecycleState.NEW, {"steps": list(range(40))}),
        SnapshotLayer("tools", LifecycleState.CLOSED, {"calls": {"n": rng.randint(0, 99)}}),
    ]
    return Snapshot(layers=tuple(layers))


def session(key_no: int, version: int, snap: Snapshot) -> StoredSession:
    key = SessionKey("tenant-1", f"run-{key_no // 50}", f"node-{key_no}", "binding", "agent")
    specs = (LayerSpec("history", "pydantic_ai.history", config={"max_messages": 50}),)
    write = SessionWrite(snap, specs, "app", "workflow", f"exec-{version}", "config-1")
    stamp = now_iso()
    return StoredSession(key, SessionStatus.ACTIVE, version, write, 0, stamp, stamp)


def batches(rng: random.Random) -> tuple[list[StoredSession], list[list[StoredSession]]]:
    """The seed rows and 20 batches: each updates the previous batch's 250 new keys."""
    pool = [snapshot(rng) for _ in range(64)]
    seed = [session(k, 1, rng.choice(pool)) for k in range(BATCH // 2)]
    out, previous_new = [], range(BATCH // 2)
    for b in range(BATCHES):
        new = range((b + 1) * BATCH // 2, (b + 2) * BATCH // 2)
        updates = [session(k, 2, rng.choice(pool)) for k in previous_new]
        out.append(updates + [session(k, 1, rng.choice(pool)) for k in new])
        previous_new = new
    return seed, out


def raw_row(s: StoredSession, now: datetime) -> dict[str, Any]:
    row = dict(zip(ROW_COLUMNS, row_of_session(s, now).values, strict=True))
    row["layer_specs"] = Jsonb(row["layer_specs"])
    return {"key_prefix": PREFIX, **row}


def shape_values(engine: Engine) -> Callable[[list[StoredSession]], int]:
    def run(batch: list[StoredSession]) -> int:
        now = datetime.now(UTC)
        insert = pg_insert(sessions).values(
            [
                {
                    "key_prefix": PREFIX,
                    **dict(zip(ROW_COLUMNS, row_of_session(s, now).values, strict=True)),
                }
                for s in batch
            ]
        )
        stmt = insert.on_conflict_do_update(
            index_elements=list(UNIQUE_COLUMNS[OwnerType.WORKFLOW_RUN]),
            index_where=sa.text(WORKFLOW_ROWS),
            set_={**{c: insert.excluded[c] for c in COLUMNS}, "flushed_at": sa.func.now()},
            where=sessions.c.version < insert.excluded.version,
        ).returning(*(sessions.c[k] for k in WORKFLOW_KEYS), sessions.c.version)
        with engine.begin() as conn:
            return len(conn.execute(stmt).all())

    return run


def shape_values_raw(engine: Engine) -> Callable[[list[StoredSession]], int]:
    width = len(COLUMNS)
    rows_sql = ", ".join(
        "(" + ", ".join(f"${r * width + i + 1}" for i in range(width)) + ")" for r in range(BATCH)
    )
    sql = f"INSERT INTO {TABLE_NAME} ({', '.join(COLUMNS)}) VALUES {rows_sql} {TAIL}"

    def run(batch: list[StoredSession]) -> int:
        now = datetime.now(UTC)
        params = [v for s in batch for v in (raw_row(s, now)[c] for c in COLUMNS)]
        with engine.begin() as conn:
            raw = conn.connection.driver_connection
            cur = psycopg.RawCursor(raw)  # type: ignore[arg-type]
            return len(cur.execute(sql, params).fetchall())

    return run


def rows_of(batch: list[StoredSession]) -> list[SessionRow]:
    now = datetime.now(UTC)
    return [row_of_session(session, now) for session in batch]


def shape_repository(engine: Engine) -> Callable[[list[StoredSession]], int]:
    repo = SessionRepository(engine, PREFIX)
    return lambda batch: len(repo.upsert_rows(rows_of(batch)).written)


def shape_executemany(engine: Engine) -> Callable[[list[StoredSession]], int]:
    def run(batch: list[StoredSession]) -> int:
        now = datetime.now(UTC)
        with engine.begin() as conn:
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            cur.executemany(ONE_ROW_SQL, [raw_row(s, now) for s in batch], returning=True)
            written = 0
            while True:
                written += len(cur.fetchall())
                if not cur.nextset():
                    return written

    return run


def shape_unnest(engine: Engine) -> Callable[[list[StoredSession]], int]:
    def run(batch: list[StoredSession]) -> int:
        now = datetime.now(UTC)
        rows = [raw_row(s, now) for s in batch]
        arrays = [[r[c] for r in rows] for c in COLUMNS]
        with engine.begin() as conn:
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            return len(cur.execute(UNNEST_SQL, arrays).fetchall())

    return run


def reset(engine: Engine, compression: str, seed: list[StoredSession]) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {TABLE_NAME}")
        conn.exec_driver_sql(
            f"ALTER TABLE {TABLE_NAME} ALTER COLUMN snapshot SET COMPRESSION {compression}"
        )
    SessionRepository(engine, PREFIX).upsert_rows(rows_of(seed))
    with engine.connect() as conn:
        conn.exec_driver_sql("CHECKPOINT")


def one_rep(
    engine: Engine, shape: Callable[[list[StoredSession]], int], work: list[list[StoredSession]]
) -> tuple[list[float], float]:
    times = []
    start = time.perf_counter()
    for batch in work:
        t0 = time.perf_counter()
        written = shape(batch)
        times.append(time.perf_counter() - t0)
        assert written == len(batch), (written, len(batch))
    return times, len(work) * BATCH / (time.perf_counter() - start)


def stored_size(engine: Engine) -> str:
    with engine.connect() as conn:
        row = conn.exec_driver_sql(
            f"SELECT avg(octet_length(snapshot))::int, avg(pg_column_size(snapshot))::int, "
            f"pg_size_pretty(pg_total_relation_size('{TABLE_NAME}')) FROM {TABLE_NAME}"
        ).one()
    return f"raw {row[0]} B -> stored {row[1]} B/row; table {row[2]}"


@contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    name = f"asc_measure_storage_{os.getpid()}"
    admin = make_url(server_url).set(drivername="postgresql", database="postgres")
    plain = admin.render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    args = parser.parse_args()
    seed, work = batches(random.Random(42))
    sizes = [len(pack(s.snapshot.to_dict())) for s in work[0]]
    print(f"snapshot msgpack size: median {statistics.median(sizes):.0f} B")
    with scratch_database(args.url) as url:
        migrate.upgrade(url)
        engine = create_engine(url)
        shapes = {
            "values": shape_values,
            "values-raw": shape_values_raw,
            "executemany": shape_executemany,
            "unnest": shape_repository,
            "unnest-raw": shape_unnest,
        }
        print("| shape | compression | batch median | batch p99 | rows/s (median, min..max) |")
        print("|---|---|---|---|---|")
        for compression in ("lz4", "pglz"):
            for name, make in shapes.items():
                medians, p99s, rates = [], [], []
                for _ in range(args.reps):
                    reset(engine, compression, seed)
                    times, rate = one_rep(engine, make(engine), work)
                    medians.append(statistics.median(times))
                    p99s.append(sorted(times)[int(0.99 * (len(times) - 1))])
                    rates.append(rate)
                print(
                    f"| {name} | {compression} | {statistics.median(medians) * 1e3:.1f} ms "
                    f"| {statistics.median(p99s) * 1e3:.1f} ms | {statistics.median(rates):,.0f} "
                    f"({min(rates):,.0f}..{max(rates):,.0f}) |"
                )
            print(f"<!-- {compression}: {stored_size(engine)} -->")
        engine.dispose()


if __name__ == "__main__":
    main()
