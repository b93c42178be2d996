"""Draining: flush every dirty session now, in this process, until nothing is dirty.

For deploys and shutdown (``agent-sessions flush --wait``). It ignores ``flush_delay_ms`` and
takes each shard's flush lock, so it cooperates with running workers. A save the flush had to
refuse because its run ended is not left for the reconciler: the drain reconciles that run
itself, so that it ends with nothing dirty.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cache.records import Owner
from workers.context import WorkerContext
from workers.flush import FlushReport, flush_shard
from workers.reconcile import reconcile_owner

DRAIN_LOCK_WAIT_S = 5.0
IDLE_PASS_PAUSE_S = 0.1


@dataclass
class DrainReport:
    drained: bool
    written: int = 0
    poisoned: int = 0
    left: int = 0
    parked: int = 0
    """Sessions in the poison hashes when the drain ended (parked by this drain or before):
    they are not dirty, but Postgres does not hold their Redis version either."""
    passes: int = 0


def dirty_total(ctx: WorkerContext) -> list[tuple[int, int]]:
    """``(shard, dirty count)`` of every shard that has dirty entries."""
    backlog = ctx.cache.shard_backlog(list(ctx.cache.keys.all_shards()))
    return [(shard, count) for shard, count, _ in backlog if count]


def drain(
    ctx: WorkerContext,
    *,
    timeout_s: float = 300.0,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> DrainReport:
    """Flush until no shard has a dirty entry, or until ``timeout_s`` passes, with
    ``threads`` flushers (default ``flush_threads``) each taking whole shards.

    Threads share the context: each has its own pinned Redis connection and Postgres
    connection, so while one waits on Postgres another reads and builds its rows.
    """
    deadline = time.monotonic() + timeout_s
    report = DrainReport(drained=False)
    with ThreadPoolExecutor(threads or ctx.settings.flush_threads, "drain") as pool:
        while not _drained(ctx, report, deadline, progress, pool):
            pass
    report.parked = sum(ctx.cache.poison_sizes(list(ctx.cache.keys.all_shards())).values())
    return report


def _drained(
    ctx: WorkerContext,
    report: DrainReport,
    deadline: float,
    progress: Callable[[int], None] | None,
    pool: ThreadPoolExecutor,
) -> bool:
    """One pass over every dirty shard; ``True`` when the drain is over (done or out of
    time)."""
    pending = dirty_total(ctx)
    report.left = sum(count for _, count in pending)
    if progress is not None:
        progress(report.left)
    if not pending:
        report.drained = True
        return True
    if time.monotonic() > deadline:
        return True
    report.passes += 1
    before, poisoned = report.written, report.poisoned
    results = list(pool.map(lambda shard: _flush_now(ctx, shard), [s for s, _ in pending]))
    for result in results:
        _settle(ctx, result, report)
    ctx.cache.count(  # once per pass, not per shard: the counters cost a round trip
        rows_flushed=report.written - before,
        rows_poisoned=report.poisoned - poisoned,
        flushes=sum(result.locked for result in results),
    )
    if report.written == before:
        time.sleep(IDLE_PASS_PAUSE_S)  # nothing landed: locked shards or deferred rows
    return False


def _flush_now(ctx: WorkerContext, shard: int) -> FlushReport:
    return flush_shard(
        ctx.cache,
        ctx.repo,
        shard,
        delay_ms=0,
        limit=ctx.settings.flush_batch,
        lock_wait_s=DRAIN_LOCK_WAIT_S,
    )


def _settle(ctx: WorkerContext, result: FlushReport, report: DrainReport) -> None:
    """Count one shard's flush; reconcile the runs whose ended state refused a save."""
    report.written += result.written
    report.poisoned += len(result.poisoned)
    for run in {_run_of(ctx, name) for name in result.run_ended}:
        end = ctx.repo.end_of(run)
        if end is not None:
            reconcile_owner(ctx, run, end.outcome)


def _run_of(ctx: WorkerContext, name: str) -> Owner:
    key = ctx.cache.keys.parse_session(name)
    return key.owner
