"""RQ job functions. Arguments are JSON values; the work is in plain functions they call.

These two functions are the whole list of what a worker will run: ``SessionWorker`` drops
any other job unrun (``workers.door``), because whoever can write to the queue's Redis could
otherwise name any importable function.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

from rq import get_current_job

from agent_backend.client import WaitStopped
from cache import keys
from cache.errors import StoreUnavailable
from cache.metrics import CLEANUPS
from cache.records import OwnerType, SessionKey
from persistence.errors import PersistenceUnavailable
from workers.cleanup import (
    Cleaner,
    CleanupLease,
    CleanupResult,
    drop_marker,
    lease_ttl_ms,
    renew_marker,
    request_cleanup,
)
from workers.context import STOP_REQUESTED, WorkerContext, current
from workers.flush import FlushReport, flush_shards
from workers.flush_policy import (
    MAX_BATCHES_PER_JOB,
    RETRY_PAUSES_S,
    URGENT_LOCK_WAIT_S,
)
from workers.queues import (
    back_off,
    backing_off,
    clear_pending,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


def flush_job(shards: int | list[int], urgent: bool = False) -> dict[str, Any]:
    """Flush each of ``shards`` (one shard, or the group the trigger handed this job) until
    nothing eligible is left in it (bounded, so a job stays short).

    A normal flush takes entries older than ``flush_delay_ms``; an urgent one takes all.
    An outage is retried in the job a few times, then the job fails; the trigger asks again
    while the entries stay dirty (after a short backoff when Postgres was the cause).
    """
    ctx = current()
    listed = shards if isinstance(shards, list) else [shards]
    for shard in listed:
        _started(ctx, shard, urgent)
    if backing_off(ctx.queue_redis, ctx.settings.key_prefix):
        return {"shards": listed, "skipped": "postgres backoff"}
    totals = {shard: FlushReport(shard) for shard in listed}
    try:
        _flush_group(ctx, totals, urgent)
    finally:  # counted once per job (a round trip); best effort, never the job's failure
        reports = list(totals.values())
        with contextlib.suppress(StoreUnavailable):
            ctx.cache.count(
                rows_flushed=sum(r.written for r in reports),
                rows_poisoned=sum(len(r.poisoned) for r in reports),
                flushes=sum(r.batches for r in reports),
            )
    result = _job_result(listed, reports)
    written, acked = result["written"], result["acked"]
    log.info("flush of %d shard(s): %d written, %d acknowledged", len(listed), written, acked)
    return result


def _flush_group(ctx: WorkerContext, totals: dict[int, FlushReport], urgent: bool) -> None:
    """Up to :data:`MAX_BATCHES_PER_JOB` batches of each shard of ``totals`` (which adds them
    up), the shards flushed together (:func:`workers.flush.flush_shards`); an urgent flush
    that could not finish asks for another."""
    left = list(totals)
    for _ in range(MAX_BATCHES_PER_JOB):
        reports = _with_retries(ctx, functools.partial(_flush_once, ctx, left, urgent))
        for report in reports:
            _add(totals[report.shard], report)
            totals[report.shard].batches += report.locked
            if urgent and not report.locked:
                _request_urgent_again(ctx, report.shard, "it stayed locked")
        left = [report.shard for report in reports if report.full and report.locked]
        if not left:
            break
    else:  # the budget ran out with full batches left: a pause may sit deeper
        for shard in left if urgent else ():
            _request_urgent_again(ctx, shard, "its batch budget ran out")
    for report in totals.values():
        if report.poisoned or report.deferred or report.run_ended or not report.locked:
            log.info("flush s%03d: %s", report.shard, report)


def _job_result(shards: list[int], reports: list[FlushReport]) -> dict[str, Any]:
    return {
        "shards": shards,
        "written": sum(r.written for r in reports),
        "acked": sum(r.acked for r in reports),
        "poisoned": [name for r in reports for name in r.poisoned],
        "deferred": [name for r in reports for name in r.deferred],
        "locked": all(r.locked for r in reports),
    }


def _started(ctx: WorkerContext, shard: int, urgent: bool) -> None:
    """Clear the shard's pending marker: from now on a new save needs a job of its own."""
    job = get_current_job()
    if job is not None:
        marker = keys.flush_pending(ctx.settings.key_prefix, shard, urgent=urgent)
        clear_pending(ctx.queue_redis, marker, job.id)


def _flush_once(ctx: WorkerContext, shards: list[int], urgent: bool) -> list[FlushReport]:
    return flush_shards(
        ctx.cache,
        ctx.repo,
        shards,
        delay_ms=0 if urgent else ctx.settings.flush_delay_ms,
        limit=ctx.settings.flush_batch,
        lock_wait_s=URGENT_LOCK_WAIT_S if urgent else 0.0,
    )


def _request_urgent_again(ctx: WorkerContext, shard: int, why: str) -> None:
    """The save this job is for may not be flushed yet: another flush held the shard all
    along (and may have read its batch before the save), or the backlog is deeper than one
    job's budget. Queue one more urgent job rather than leave it to the delay."""
    log.info("urgent flush s%03d: %s; asking again", shard, why)
    ctx.request_flush(shard)


def _with_retries(ctx: WorkerContext, call: Callable[[], T]) -> T:
    """``call()``, retried after short pauses on an outage; a Postgres outage that outlasts
    them starts the backoff before the error is raised."""
    for pause in RETRY_PAUSES_S:
        try:
            return call()
        except (PersistenceUnavailable, StoreUnavailable) as exc:
            log.warning("flush failed (%s); retrying in %ss", exc, pause)
            time.sleep(pause)
    try:
        return call()
    except PersistenceUnavailable as exc:
        back_off(ctx.queue_redis, ctx.settings.key_prefix, str(exc))
        raise


def _add(totals: FlushReport, report: FlushReport) -> None:
    totals.locked = totals.locked and report.locked
    totals.read += report.read
    totals.written += report.written
    totals.acked += report.acked
    totals.still_dirty = report.still_dirty
    totals.poisoned += report.poisoned
    totals.deferred += report.deferred
    totals.run_ended += report.run_ended


def cleanup_job(  # noqa: PLR0917 (RQ passes a job's JSON arguments by position)
    tenant_id: str,
    owner_id: str,
    first: str,
    second: str,
    third: str,
    owner_type: str = OwnerType.WORKFLOW_RUN.value,
) -> dict[str, Any]:
    """Clean one ``cleaning`` session up on the backend; raise so RQ retries it on its own.

    The arguments are the key's ``parts()`` and its owner type (jobs queued before
    conversations existed have no owner type: a workflow run's). The attempt holds the
    session's lease while it runs (another job of the session skips). On the job's last
    attempt a failure marks the session ``cleaned`` with the error kept. A worker asked to
    stop hands the cleanup back: queued again, for the next worker to finish.
    """
    ctx = current()
    job = get_current_job()
    last_attempt = job is None or not job.retries_left
    job_id = job.id if job is not None else f"local-{secrets.token_hex(4)}"
    key = SessionKey.of_parts(owner_type, tenant_id, owner_id, first, second, third)
    name, prefix = ctx.cache.keys.session(key), ctx.settings.key_prefix
    lease = CleanupLease(
        ctx.queue_redis, keys.cleanup_lease(prefix, name), job_id, lease_ttl_ms(ctx.settings)
    )
    if not lease.take():
        log.info("cleanup %s: another job of it is running; this one ends", key)
        drop_marker(ctx.queue_redis, prefix, name, job_id)
        return _cleanup_outcome(ctx, CleanupResult("skipped"))
    try:
        result = _clean(ctx, key, name, last_attempt=last_attempt)
    finally:
        lease.release()
    if result.outcome == "handed_back":
        _hand_back(ctx, key, name)
    else:
        drop_marker(ctx.queue_redis, prefix, name, job_id)
        log.info("cleanup %s: %s", key, result)
    return _cleanup_outcome(ctx, result)


def _clean(ctx: WorkerContext, key: SessionKey, name: str, *, last_attempt: bool) -> CleanupResult:
    """One attempt, under the session's lease; ``handed_back`` when the worker is stopping."""
    renew_marker(ctx.queue_redis, ctx.settings.key_prefix, name)
    cleaner = Cleaner(
        ctx.cache, ctx.repo, ctx.backend, ctx.settings.cleanup_wait_s, stop=STOP_REQUESTED
    )
    try:
        return cleaner.clean(key, last_attempt=last_attempt)
    except WaitStopped:
        return CleanupResult("handed_back")


def _hand_back(ctx: WorkerContext, key: SessionKey, name: str) -> None:
    """The worker stops mid-cleanup: queue the cleanup again (the lease is gone, so the
    request takes the marker over) for the next worker, which asks the remembered run first."""
    queued = request_cleanup(
        ctx.cleanup_queue, ctx.settings.key_prefix, name, key, ctx.settings.cleanup_attempts
    )
    log.info("cleanup %s handed back (%s)", key, "queued again" if queued else "already queued")


def _cleanup_outcome(ctx: WorkerContext, result: CleanupResult) -> dict[str, Any]:
    ctx.cache.count(**{f"cleanups_{result.outcome}": 1})
    CLEANUPS.labels(result.outcome).inc()
    return {
        "outcome": result.outcome,
        "cleanup_run_id": result.cleanup_run_id,
        "error": result.error,
    }
