"""flush_lag: how long a change waits in Redis before Postgres has it, under sustained load.

A real ``agent-sessions worker`` pool (2 processes + the flush trigger) runs with the default
``flush_delay_ms`` (1000) while this process saves ~8 KB snapshots at a steady 1,000 saves/s
round-robin over 500 sessions (50 concurrent workflow runs x 10 Agent nodes) for 30 s
(``--quick``: 8 s). Measured from the outside, with no help from the product's own scores:

- every save is timed on the client (wall clock just before the call) with the version it
  returned;
- a row trigger logs every Postgres write of a session (key, version, ``flushed_at``).

Each write makes durable the versions after the previous write of that session; the oldest
of them is the change that waited longest (a dirty period: "the oldest change bounds the
lag"). lag = ``flushed_at`` of the write - client time of that oldest save. After the load
stops the pool flushes what is left, so every period is counted. value = p99 of the lags
(seconds); goal: p99 <= flush_delay + 1 s; ratio = p99 / flush_delay. ``flushed_at`` is the
flush transaction's start (its commit lands a few ms later); Redis, Postgres and this
process share one clock.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench.harness import (
    Result,
    make_result,
    median,
    percentile,
    private_redis,
)
from bench.hot_path import build_keys, build_write
from bench.plot import plot_path, plot_write_behind
from bench.stack import (
    WorkerPool,
    bench_settings,
    migrated_database,
    wait_for,
    worker_context,
    worker_pool,
)
from cache.records import SessionKey
from persistence.models import TABLE_NAME
from workers.context import WorkerContext
from workers.drain import dirty_total

NAME = "flush_lag"
METRIC = "p99 time from first dirty to written in Postgres (default flush_delay)"
WORKERS = 2
SESSIONS = 500
RATE_PER_S = 1000
WINDOW_S = 10.0


PLOT = "write_behind.png"


@dataclass(frozen=True)
class Plan:
    seconds: float
    quick: bool


QUICK = Plan(seconds=8.0, quick=True)
FULL = Plan(seconds=30.0, quick=False)


SaveTimes = dict[tuple[str, str], dict[int, float]]
"""Per session (run, node): client time of the save that returned each version."""


@dataclass
class Load:
    saves: SaveTimes = field(default_factory=dict)
    count: int = 0
    seconds: float = 0.0
    start_s: float = 0.0
    settle_s: float = 0.0  # after the load: until the pool had flushed everything
    job_ms: list[float] = field(default_factory=list)  # what RQ logged per flush job


def install_flush_log(db_url: str) -> None:
    """A row trigger that logs every write of a session: (run, node, version, flushed_at)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE bench_flush_log (workflow_run_id text, node_id text, "
            "version bigint, flushed_at timestamptz)"
        )
        conn.execute(
            "CREATE FUNCTION bench_log_flush() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "INSERT INTO bench_flush_log VALUES "
            "(NEW.workflow_run_id, NEW.node_id, NEW.version, NEW.flushed_at); "
            "RETURN NEW; END $$"
        )
        conn.execute(
            f"CREATE TRIGGER bench_log_flushes AFTER INSERT OR UPDATE ON {TABLE_NAME} "
            "FOR EACH ROW EXECUTE FUNCTION bench_log_flush()"
        )


FlushLog = dict[tuple[str, str], tuple[list[int], list[float]]]


def read_flush_log(db_url: str) -> FlushLog:
    """Per session: its written versions in order and the matching ``flushed_at`` (epoch s)."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT workflow_run_id, node_id, version, extract(epoch FROM flushed_at) "
            "FROM bench_flush_log ORDER BY workflow_run_id, node_id, version"
        ).fetchall()
    log: FlushLog = {}
    for run, node, version, at in rows:
        versions, times = log.setdefault((run, node), ([], []))
        versions.append(int(version))
        times.append(float(at))
    return log


def _apply_load(ctx: WorkerContext, keys: Sequence[SessionKey], seconds: float) -> Load:
    """Save round-robin at :data:`RATE_PER_S` for ``seconds``, timing every save."""
    cache, write, load = ctx.cache, build_write(), Load(start_s=time.time())
    times = [load.saves.setdefault((k.owner_id, k.node_id), {}) for k in keys]
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        i = load.count % len(keys)
        before = time.time()
        times[i][cache.save(keys[i], write)] = before
        load.count += 1
        ahead = load.count / RATE_PER_S - elapsed
        if ahead > 0:
            time.sleep(ahead)
    load.seconds = time.monotonic() - start
    return load


def period_lags(saves: SaveTimes, log: FlushLog) -> list[tuple[float, float]]:
    """``(oldest change's save time, lag)`` per write: what each write made durable first."""
    out = []
    for key, (versions, written_at) in log.items():
        previous = 0
        for version, at in zip(versions, written_at, strict=True):
            saved = saves[key].get(previous + 1)
            if saved is not None:
                out.append((saved, at - saved))
            previous = version
    return out


def save_lags(saves: SaveTimes, log: FlushLog) -> list[float]:
    """Lag of every single save: its first write at a version at least its own."""
    out = []
    for key, times in saves.items():
        versions, written_at = log[key]
        for version, saved in times.items():
            first = bisect.bisect_left(versions, version)
            if first == len(versions):
                raise RuntimeError(f"{key} version {version} never reached Postgres")
            out.append(written_at[first] - saved)
    return out


@contextmanager
def _stack() -> Iterator[tuple[WorkerContext, str, WorkerPool]]:
    with ExitStack() as stack:
        redis_url = stack.enter_context(private_redis())
        db_url = stack.enter_context(migrated_database())
        install_flush_log(db_url)
        settings = bench_settings(redis_url, db_url)
        ctx = stack.enter_context(worker_context(settings))
        yield ctx, db_url, stack.enter_context(worker_pool(settings, WORKERS))


@dataclass
class Lags:
    periods: list[tuple[float, float]]  # (oldest change's save time, lag) per write
    saves: list[float]  # lag of every save
    written_at: list[float]  # flushed_at of every Postgres write


def written_times(log: FlushLog) -> list[float]:
    return [at for _, times in log.values() for at in times]


def _measure(plan: Plan) -> tuple[Load, Lags, float]:
    keys = build_keys(SESSIONS)
    with _stack() as (ctx, db_url, pool):
        print(f"  {SESSIONS} sessions, {RATE_PER_S} saves/s for {plan.seconds:.0f} s…", flush=True)
        load = _apply_load(ctx, keys, plan.seconds)
        load.settle_s = wait_for(
            lambda: not dirty_total(ctx), "the pool to flush the rest", poll_s=0.1
        )
        log = read_flush_log(db_url)
        lags = Lags(period_lags(load.saves, log), save_lags(load.saves, log), written_times(log))
        load.job_ms = [round(s * 1000, 1) for s in pool.job_seconds()]
        delay_s = ctx.settings.flush_delay_ms / 1000
    return load, lags, delay_s


def _windows(measured: Sequence[tuple[float, float]], start_s: float) -> list[float]:
    """p99 of the periods that began in each :data:`WINDOW_S` window of the load."""
    buckets: dict[int, list[float]] = {}
    for since, lag in measured:
        buckets.setdefault(int((since - start_s) // WINDOW_S), []).append(lag)
    return [round(percentile(b, 99), 3) for _, b in sorted(buckets.items()) if len(b) >= 20]


def _plot(load: Load, lags: Lags, delay_s: float, quick: bool) -> dict[str, str]:
    """docs/write_behind.png on a full run, bench/results/write_behind.png on a quick one."""
    saved_at = [at for times in load.saves.values() for at in times.values()]
    lag_values = [lag for _, lag in lags.periods]
    path = plot_write_behind(saved_at, lags.written_at, lag_values, delay_s, plot_path(PLOT, quick))
    return {"plot_preview": f"bench/results/{path.name}"} if quick else {"plot": path.name}


def _result(load: Load, lags: Lags, delay_s: float, quick: bool) -> Result:
    values = [lag for _, lag in lags.periods]
    p99 = percentile(values, 99)
    windows = _windows(lags.periods, load.start_s)
    extra: dict[str, Any] = {
        "spread": f"p99 per {WINDOW_S:.0f} s window {min(windows):.2f}-{max(windows):.2f} s",
        "p50_s": round(median(values), 3),
        "p99_s": round(p99, 3),
        "max_s": round(max(values), 3),
        "window_p99_s": windows,
        "periods": len(values),
        "every_save_p50_p99_s": [
            round(median(lags.saves), 3),
            round(percentile(lags.saves, 99), 3),
        ],
        "saves": load.count,
        "saves_per_s": round(load.count / load.seconds),
        "load_seconds": round(load.seconds, 1),
        "settle_after_load_s": round(load.settle_s, 2),
        "flush_jobs": len(load.job_ms),
        "flush_jobs_per_s": round(len(load.job_ms) / (load.seconds + load.settle_s), 1),
        "flush_job_ms_p50_p99": [
            round(median(load.job_ms), 1) if load.job_ms else None,
            round(percentile(load.job_ms, 99), 1) if load.job_ms else None,
        ],
        "sessions": SESSIONS,
        "flush_workers": WORKERS,
        "flush_delay_s": delay_s,
        "ratio_p99_to_flush_delay": round(p99 / delay_s, 3),
        "saves_per_postgres_write": round(load.count / max(len(lags.written_at), 1), 2),
        "what": (
            "per Postgres write (a row trigger logs each): flushed_at - client time of the "
            "oldest save it made durable (the first version after the previous write); "
            "flushed_at is the flush transaction's start, its commit lands a few ms later"
        ),
        **_plot(load, lags, delay_s, quick),
    }
    return make_result(
        NAME,
        METRIC,
        value=round(p99, 3),
        baseline=delay_s,
        goal=f"<= {delay_s + 1:g}",
        unit="s",
        goal_on="value",
        extra=extra,
    )


def run(quick: bool) -> Result:
    plan = QUICK if quick else FULL
    return _result(*_measure(plan), quick=plan.quick)
