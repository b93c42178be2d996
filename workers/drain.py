"""Draining: flush every dirty session now, in this process, until nothing is dirty.

For deploys and shutdown (``agent-sessions flush --wait``). It ignores ``flush_delay_ms`` and
takes each shard's flush lock, so it cooperates with running workers. A save the flush had to
refuse because its run ended is not left for the reconciler: the drain reconciles that run
itself, so that it ends with nothing dirty.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cache.records import RunRef
from workers.context import WorkerContext
from workers.flush import flush_shard
from workers.reconcile import reconcile_run

DRAIN_LOCK_WAIT_S = 5.0
IDLE_PASS_PAUSE_S = 0.1


@dataclass
class DrainReport:
    drained: bool
    written: int = 0
    poisoned: int = 0
    left: int = 0
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
) -> DrainReport:
    """Flush until no shard has a dirty entry, or until ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    report = DrainReport(drained=False)
    while True:
        pending = dirty_total(ctx)
        report.left = sum(count for _, count in pending)
        if progress is not None:
            progress(report.left)
        if not pending:
            report.drained = True
            return report
        if time.monotonic() > deadline:
            return report
        report.passes += 1
        before = report.written
        for shard, _ in pending:
            _flush_all_now(ctx, shard, report)
        if report.written == before:
            time.sleep(IDLE_PASS_PAUSE_S)  # nothing landed: locked shards or deferred rows


def _flush_all_now(ctx: WorkerContext, shard: int, report: DrainReport) -> None:
    result = flush_shard(
        ctx.cache,
        ctx.repo,
        shard,
        cutoff_ms=ctx.cache.server_time_ms(),
        limit=ctx.settings.flush_batch,
        lock_wait_s=DRAIN_LOCK_WAIT_S,
    )
    report.written += result.written
    report.poisoned += len(result.poisoned)
    for run in {_run_of(ctx, name) for name in result.run_ended}:
        end = ctx.repo.run_end(run)
        if end is not None:
            reconcile_run(ctx, run, end.outcome)
    ctx.cache.count(
        rows_flushed=result.written,
        rows_poisoned=len(result.poisoned),
        flushes=int(result.locked),
    )


def _run_of(ctx: WorkerContext, name: str) -> RunRef:
    key = ctx.cache.keys.parse_session(name)
    return RunRef(key.tenant_id, key.workflow_run_id)
