"""flush_throughput: rows/s from dirty in Redis to written in Postgres and acknowledged.

20,000 sessions (2,000 runs x 10 nodes, spread over the 256 shards) with ~8 KB snapshots
are saved dirty with a pipelined fill; their rows already exist in Postgres at an older
version (a seeded table: the steady state, where a flush updates rows). Timed:

- **ours** (the value): ``workers.drain.drain(threads=1)`` in this process, i.e.
  ``flush_shard`` per shard: take the lock and list the entries (``begin_flush``, one round
  trip), ``HMGET`` the column fields (one pipeline), build the rows straight from those
  bytes, one fenced unnest upsert per shard batch on an autocommit connection, then
  ``ack_flush`` (which releases the lock); done when nothing is dirty.
- **raw** (the baseline): psycopg alone writing the same rows, already encoded in memory, in
  the same batches (same shards, same order) with the same statement shape: one
  ``INSERT ... SELECT FROM unnest(%b arrays) ON CONFLICT ... DO UPDATE ... WHERE version <``
  per batch, one commit per batch. No Redis read, no decode, no acknowledgement.

Also timed in the same run: **ours** with two flusher threads (``drain(threads=2)``) beside
**raw** on two connections (two threads, the batches dealt between them).

Before every timed pass the table is truncated, re-seeded and checkpointed; the arms
alternate. Informational (``extra``): the same flush through real worker processes
(``agent-sessions worker -n N``, urgent flush jobs for every shard, timed until nothing is
dirty), and one shard's flush with a brand-new context (new engine, connections, statement
compile) against this process's warm one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bench.harness import (
    Result,
    frozen_heap,
    make_result,
    median,
    private_redis,
    spread_text,
)
from bench.hot_path import build_keys, build_write
from bench.stack import (
    bench_settings,
    bulk_save,
    migrated_database,
    wait_for,
    worker_context,
    worker_pool,
)
from cache.clock import now_iso
from cache.records import OwnerType, SessionKey, SessionStatus, StoredSession
from persistence.models import KEY_COLUMNS, OWNER_ROWS, TABLE_NAME, UNIQUE_COLUMNS, sessions
from persistence.rows import COLUMNS as ROW_COLUMNS
from persistence.rows import HASH_FIELDS, row_of_hash, row_of_session
from workers.context import WorkerContext
from workers.drain import dirty_total, drain
from workers.flush import flush_shard
from workers.flush_policy import pending_ttl_ms
from workers.queues import FlushRequest, request_flush

NAME = "flush_throughput"
METRIC = "rows/s flushed end to end (dirty -> Postgres -> acked), 8 KB"
GOAL = ">= 0.55"
NEVER_MS = 3_600_000  # flush delay of the pool phase: only the urgent jobs we enqueue flush


@dataclass(frozen=True)
class Plan:
    sessions: int
    reps: int
    pool_sizes: tuple[int, ...]


QUICK = Plan(sessions=5_000, reps=2, pool_sizes=(2,))
FULL = Plan(sessions=20_000, reps=3, pool_sizes=(1, 2))

_COLUMNS = tuple(
    c.name for c in sessions.columns if c.name not in {"id", "flushed_at", "key_prefix"}
)
"""The columns the raw arm sends as arrays (``key_prefix``, one value for all, goes first)."""


def _array_type(column: str) -> str:
    """The Postgres element type to cast a column's array parameter to."""
    import sqlalchemy as sa
    from sqlalchemy.dialects.postgresql import JSON

    kind = sessions.c[column].type
    for sa_type, name in (
        (JSON, "json"),
        (sa.BigInteger, "bigint"),
        (sa.LargeBinary, "bytea"),
        (sa.DateTime, "timestamptz"),
        (sa.String, "text"),
    ):
        if isinstance(kind, sa_type):
            return name
    raise TypeError(f"no array type for {column}: {kind!r}")


def _unnest_sql() -> str:
    unique = ", ".join(UNIQUE_COLUMNS[OwnerType.WORKFLOW_RUN])
    keys = ", ".join(KEY_COLUMNS[OwnerType.WORKFLOW_RUN])
    columns = ", ".join(_COLUMNS)
    arrays = ", ".join(f"%b::{_array_type(c)}[]" for c in _COLUMNS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS)
    return (
        f"INSERT INTO {TABLE_NAME} (key_prefix, {columns}) "
        f"SELECT %b::text, * FROM unnest({arrays}) "
        f"ON CONFLICT ({unique}) WHERE {OWNER_ROWS[OwnerType.WORKFLOW_RUN]} "
        f"DO UPDATE SET {updates}, flushed_at = now() "
        f"WHERE {TABLE_NAME}.version < excluded.version RETURNING {keys}, version"
    )


UNNEST_SQL = _unnest_sql()


# --------------------------------------------------------------------------------- rows


def _session(key: SessionKey, version: int) -> StoredSession:
    stamp = now_iso()
    return StoredSession(key, SessionStatus.ACTIVE, version, build_write(), 0, stamp, stamp)


def _batches(ctx: WorkerContext, keys: Sequence[SessionKey]) -> list[list[SessionKey]]:
    """The keys grouped as ``drain`` flushes them: by shard, in shard order, batch-sized."""
    by_shard: dict[int, list[SessionKey]] = {}
    for key in keys:
        by_shard.setdefault(ctx.cache.keys.shard_of_key(key), []).append(key)
    size = ctx.settings.flush_batch
    return [
        group[i : i + size]
        for _, group in sorted(by_shard.items())
        for i in range(0, len(group), size)
    ]


def _arrays(keys: Sequence[SessionKey], version: int) -> list[list[Any]]:
    """One batch as column arrays of encoded values (what the raw arm sends)."""
    now = datetime.now(UTC)
    rows = [
        dict(zip(ROW_COLUMNS, row_of_session(_session(key, version), now).values, strict=True))
        for key in keys
    ]
    for row in rows:
        row["layer_specs"] = Jsonb(row["layer_specs"])
    return [[row[c] for row in rows] for c in _COLUMNS]


@dataclass
class RawWriter:
    """psycopg alone: the batches prepared up front, written one statement + commit each."""

    db_url: str
    key_prefix: str
    seed: list[list[list[Any]]] = field(default_factory=list)
    update: list[list[list[Any]]] = field(default_factory=list)

    def prepare(self, batches: Sequence[Sequence[SessionKey]]) -> None:
        self.seed = [_arrays(batch, 0) for batch in batches]
        self.update = [_arrays(batch, 1_000_000) for batch in batches]

    def write(self, batches: Sequence[list[list[Any]]]) -> int:
        written = 0
        with psycopg.connect(self.db_url) as conn:
            for arrays in batches:
                params = [self.key_prefix, *arrays]
                written += len(conn.execute(UNNEST_SQL, params).fetchall())
                conn.commit()
        return written

    def write_parallel(self, batches: Sequence[list[list[Any]]], connections: int) -> int:
        """The batches dealt round-robin over ``connections`` threads, one connection each."""
        with ThreadPoolExecutor(connections) as pool:
            shares = [batches[i::connections] for i in range(connections)]
            return sum(pool.map(self.write, shares))

    def reset(self) -> None:
        """Empty table, the rows seeded at version 0, a checkpoint: every pass starts equal."""
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute(f"TRUNCATE {TABLE_NAME}")
        self.write(self.seed)
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")


# --------------------------------------------------------------------------------- passes


@dataclass(frozen=True)
class Pass:
    rows: int
    seconds: float
    jobs: int = 0
    job_ms: float | None = None  # median duration RQ logged per job

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def _ours_pass(
    ctx: WorkerContext, raw: RawWriter, keys: Sequence[SessionKey], threads: int = 1
) -> Pass:
    raw.reset()
    bulk_save(ctx.cache, keys, [build_write()])
    start = time.perf_counter()
    report = drain(ctx, threads=threads)
    seconds = time.perf_counter() - start
    if not report.drained or report.written != len(keys):
        raise RuntimeError(f"drain wrote {report.written} of {len(keys)}: {report}")
    return Pass(report.written, seconds)


def _raw_pass(raw: RawWriter, expected: int, connections: int = 1) -> Pass:
    raw.reset()
    start = time.perf_counter()
    written = raw.write_parallel(raw.update, connections)
    seconds = time.perf_counter() - start
    if written != expected:
        raise RuntimeError(f"raw wrote {written} of {expected}")
    return Pass(written, seconds)


def _pool_pass(ctx: WorkerContext, raw: RawWriter, keys: Sequence[SessionKey], n: int) -> Pass:
    raw.reset()
    bulk_save(ctx.cache, keys, [build_write()])
    before = ctx.cache.counters().get("rows_flushed", 0)
    with worker_pool(ctx.settings, n) as pool:
        start = time.perf_counter()
        jobs = 0
        for shard, _ in dirty_total(ctx):
            request = request_flush(
                ctx.flush_queue,
                ctx.settings.key_prefix,
                shard,
                urgent=True,
                pending_ms=pending_ttl_ms(ctx.settings),
            )
            jobs += request is FlushRequest.ENQUEUED
        wait_for(lambda: not dirty_total(ctx), "the pool to flush everything", timeout_s=300)
        seconds = time.perf_counter() - start
        inside = pool.job_seconds()
    written = ctx.cache.counters().get("rows_flushed", 0) - before
    if written != len(keys):
        raise RuntimeError(f"the pool wrote {written} of {len(keys)}")
    return Pass(written, seconds, jobs, median(inside) * 1000 if inside else None)


def _cold_vs_warm_ms(
    ctx: WorkerContext, raw: RawWriter, keys: Sequence[SessionKey]
) -> dict[str, float]:
    """One shard's flush with this process's warm context vs a brand-new one (new engine,
    connections, statement compile): the fixed cost of a job that builds its own context."""
    raw.reset()
    bulk_save(ctx.cache, keys, [build_write()])
    shards = [shard for shard, _ in dirty_total(ctx)][:2]
    start = time.perf_counter()
    warm = flush_shard(ctx.cache, ctx.repo, shards[0], delay_ms=0, limit=500)
    warm_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    with worker_context(ctx.settings) as fresh:
        cold = flush_shard(fresh.cache, fresh.repo, shards[1], delay_ms=0, limit=500)
        cold_ms = (time.perf_counter() - start) * 1000
    drain(ctx)
    return {
        "warm_flush_ms": round(warm_ms, 1),
        "warm_rows": warm.written,
        "cold_flush_ms": round(cold_ms, 1),
        "cold_rows": cold.written,
    }


def per_row_us(
    ctx: WorkerContext, keys: Sequence[SessionKey], sample: int = 500
) -> dict[str, float]:
    """Where a flushed row's client time goes, µs per row over ``sample`` sessions: the
    pipelined ``HMGET`` of the column fields, and building the rows from those bytes."""
    cache = ctx.cache
    names = [cache.keys.session(key) for key in keys[:sample]]
    start = time.perf_counter()
    reads = cache.read_fields(names, HASH_FIELDS)
    read = time.perf_counter() - start
    now = datetime.now(UTC)
    start = time.perf_counter()
    pairs = zip(names, reads, strict=True)
    rows = [row_of_hash(n, *item, now) for n, item in pairs if isinstance(item, tuple)]
    build = time.perf_counter() - start
    if len(rows) != len(names):
        raise RuntimeError(f"read {len(rows)} of {len(names)} sessions")
    scale = 1e6 / len(names)
    return {"redis_read": round(read * scale, 1), "row_of_hash": round(build * scale, 1)}


# --------------------------------------------------------------------------------- running


@dataclass
class Measured:
    ours: list[Pass] = field(default_factory=list)
    raw: list[Pass] = field(default_factory=list)
    ours_2: list[Pass] = field(default_factory=list)
    """``drain`` with two flusher threads."""
    raw_2: list[Pass] = field(default_factory=list)
    """psycopg on two connections (two threads), the batches dealt between them."""
    pool: dict[int, Pass] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


@contextmanager
def _stack() -> Iterator[tuple[WorkerContext, str]]:
    with ExitStack() as stack:
        redis_url = stack.enter_context(private_redis())
        db_url = stack.enter_context(migrated_database())
        settings = bench_settings(redis_url, db_url, flush_delay_ms=NEVER_MS)
        yield stack.enter_context(worker_context(settings)), db_url


def _interleaved(
    ctx: WorkerContext, raw: RawWriter, keys: Sequence[SessionKey], reps: int
) -> Measured:
    measured = Measured()
    arms = {
        "ours": lambda: measured.ours.append(_ours_pass(ctx, raw, keys)),
        "raw": lambda: measured.raw.append(_raw_pass(raw, len(keys))),
        "ours_2": lambda: measured.ours_2.append(_ours_pass(ctx, raw, keys, threads=2)),
        "raw_2": lambda: measured.raw_2.append(_raw_pass(raw, len(keys), connections=2)),
    }
    for rep in range(reps):
        order = list(arms) if rep % 2 == 0 else list(reversed(arms))
        for arm in order:
            arms[arm]()
        ours, base = measured.ours[-1].rate, measured.raw[-1].rate
        ours_2, base_2 = measured.ours_2[-1].rate, measured.raw_2[-1].rate
        print(
            f"  rep {rep + 1}/{reps}: ours {ours:8,.0f} rows/s  raw {base:8,.0f} rows/s  "
            f"ratio {ours / base:.2f} | 2 threads {ours_2:8,.0f}  raw 2 conns {base_2:8,.0f}  "
            f"ratio {ours_2 / base_2:.2f}",
            flush=True,
        )
    return measured


def _measure(plan: Plan) -> Measured:
    keys = build_keys(plan.sessions)
    with _stack() as (ctx, db_url):
        raw = RawWriter(db_url, ctx.settings.key_prefix)
        batches = _batches(ctx, keys)
        raw.prepare(batches)
        print(f"  {len(keys):,} sessions in {len(batches)} shard batches; timing…", flush=True)
        with frozen_heap():  # the raw arm's prepared rows must not slow ours' collections
            measured = _interleaved(ctx, raw, keys, plan.reps)
            for n in plan.pool_sizes:
                measured.pool[n] = _pool_pass(ctx, raw, keys, n)
                print(f"  worker pool -n {n}: {measured.pool[n].rate:8,.0f} rows/s", flush=True)
            measured.facts = {
                **_cold_vs_warm_ms(ctx, raw, keys),
                "client_us_per_row": per_row_us(ctx, keys),
                "batches": len(batches),
            }
    return measured


def _result(measured: Measured, plan: Plan) -> Result:
    ours = median([p.rate for p in measured.ours])
    base = median([p.rate for p in measured.raw])
    ratios = [o.rate / r.rate for o, r in zip(measured.ours, measured.raw, strict=True)]
    ours_2 = median([p.rate for p in measured.ours_2])
    raw_2 = median([p.rate for p in measured.raw_2])
    extra: dict[str, Any] = {
        "spread": f"ratio {spread_text(ratios)}",
        "ours_rows_per_s": [round(p.rate) for p in measured.ours],
        "raw_rows_per_s": [round(p.rate) for p in measured.raw],
        "two_threads": {
            "ours_rows_per_s": round(ours_2),
            "raw_two_connections_rows_per_s": round(raw_2),
            "ratio": round(ours_2 / raw_2, 3),
            "ratio_vs_raw_one_connection": round(ours_2 / base, 3),
        },
        "pool_rows_per_s": {f"-n {n}": round(p.rate) for n, p in measured.pool.items()},
        "pool_ratio_vs_raw": {f"-n {n}": round(p.rate / base, 3) for n, p in measured.pool.items()},
        "pool_jobs": {f"-n {n}": p.jobs for n, p in measured.pool.items()},
        "pool_job_ms_logged_by_rq_median": {
            f"-n {n}": None if p.job_ms is None else round(p.job_ms, 1)
            for n, p in measured.pool.items()
        },
        "sessions": plan.sessions,
        **measured.facts,
        "what": (
            "ours = drain(threads=1) in process (flush_shard per shard: lock + entries, "
            "HMGET rows straight from the hash bytes, fenced unnest upsert, ack + unlock); "
            "raw = psycopg unnest upsert of the same pre-encoded rows in the same batches, "
            "one connection; two_threads = drain(threads=2) vs raw on two connections; "
            "all update seeded rows; pool = agent-sessions worker -n N, urgent flush jobs "
            "for every shard"
        ),
    }
    return make_result(
        NAME, METRIC, value=round(ours), baseline=round(base), goal=GOAL, unit="rows/s", extra=extra
    )


def run(quick: bool) -> Result:
    plan = QUICK if quick else FULL
    return _result(_measure(plan), plan)
