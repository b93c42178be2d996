"""Ending a run, and the reconciler that finishes any end a crash or a lost key interrupted.

``workflow_agent_runs`` in Postgres is the durable fact that a run ended; everything else
follows from it and is safe to repeat:

1. the Redis marker says ``ended`` (no TTL: it cannot be evicted while the run is unsettled);
2. every session of the run, listed in Redis *or* Postgres (a Redis key may have expired or
   been lost), goes from ``active`` to ``cleaning``;
3. every ``cleaning`` session without a live cleanup job gets one;
4. once every session is ``cleaned`` in Redis and flushed, the run is settled: the reconciler
   stops visiting it and its markers get ``ended_run_ttl_s``.

``workflow_ended`` runs it once at the end. The trigger process runs :func:`reconcile_once`
every few seconds: it claims the unsettled runs whose next check is due (bounded work per
pass; concurrent reconcilers skip each other's rows) and runs the same steps, so an end
interrupted between any two of them is finished within ``reconcile_grace_s`` plus a pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cache.records import RunRef, SessionKey, SessionStatus, StoredSession
from workers.cleanup import request_cleanup
from workers.context import WorkerContext
from workers.queues import pending_ttl_ms, request_flush

log = logging.getLogger(__name__)

RUNS_PER_PASS = 50


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What one reconciliation of one run did."""

    sessions: int
    moved_to_cleaning: int
    cleanups_requested: int
    already_ended: bool
    settled: bool


def reconcile_run(ctx: WorkerContext, run: RunRef, outcome: str) -> Reconciled:
    """Bring an ended run's Redis state in line with its end (idempotent)."""
    cache = ctx.cache
    ended = cache.end_run(run, outcome)
    keys = sorted({*ended.keys, *ctx.repo.unsettled_keys(run)}, key=SessionKey.parts)
    _fill_missing(ctx, keys)
    moved = cache.begin_cleanup(run, keys)
    names = [cache.keys.session(key) for key in keys]
    records = cache.read_many(names)
    requested = settled = 0
    for key, name, record in zip(keys, names, records, strict=True):
        if not isinstance(record, StoredSession):
            settled += record is None  # gone, or corrupt (parked in poison by the flush)
        elif record.status is SessionStatus.CLEANING:
            requested += _request_cleanup(ctx, key, name)
        elif record.status is SessionStatus.CLEANED and not record.dirty:
            settled += 1
    if moved:
        _flush_now(ctx, run)
    done = settled == len(keys)
    if done:
        ctx.repo.settle_run(run)
        cache.settle_run(run)
    return Reconciled(len(keys), moved, requested, ended.already_ended, done)


def reconcile_once(ctx: WorkerContext, limit: int = RUNS_PER_PASS) -> list[Reconciled]:
    """Reconcile up to ``limit`` unsettled ended runs whose next check is due."""
    due = ctx.repo.claim_due_runs(limit=limit, recheck_after_s=ctx.settings.reconcile_interval_s)
    done = []
    for run in due:
        try:
            end = ctx.repo.run_end(run)
            if end is not None:
                done.append(reconcile_run(ctx, run, end.outcome))
        except Exception:  # one run that keeps failing must not hold the others
            log.exception(
                "reconciling %s failed; it is checked again in %ss",
                run,
                ctx.settings.reconcile_interval_s,
            )
    return done


def _fill_missing(ctx: WorkerContext, keys: list[SessionKey]) -> None:
    """Bring back from Postgres the sessions Redis no longer has (expired or lost keys)."""
    for key in ctx.cache.missing(keys):
        row = ctx.repo.get(key)
        if row is not None:
            ctx.cache.fill(row)


def _request_cleanup(ctx: WorkerContext, key: SessionKey, name: str) -> bool:
    settings = ctx.settings
    return request_cleanup(
        ctx.cleanup_queue, settings.key_prefix, name, key, settings.cleanup_attempts
    )


def _flush_now(ctx: WorkerContext, run: RunRef) -> None:
    """The end must stick in Postgres: flush the run's shard urgently (best effort)."""
    settings = ctx.settings
    shard = ctx.cache.keys.shard_of(run.tenant_id, run.workflow_run_id)
    try:
        request_flush(
            ctx.flush_queue,
            settings.key_prefix,
            shard,
            urgent=True,
            pending_ms=pending_ttl_ms(settings),
        )
    except Exception as exc:  # the trigger flushes it once it is due
        log.warning("could not request an urgent flush of shard %s: %s", shard, exc)
