"""RQ job functions. Arguments are JSON values; the work is in plain functions they call."""

from __future__ import annotations

import logging
from typing import Any

from rq import get_current_job

from cache.errors import QueueError
from cache.metrics import CLEANUPS
from cache.records import SessionKey
from workers.cleanup import Cleaner
from workers.context import current
from workers.flush import FlushReport, flush_shard

log = logging.getLogger(__name__)


class FlushBusy(QueueError):
    """An urgent flush could not take its shard's lock in time; RQ retries the job."""


MAX_BATCHES_PER_JOB = 20
URGENT_LOCK_WAIT_S = 5.0


def flush_job(shard: int, urgent: bool = False) -> dict[str, Any]:
    """Flush one shard until nothing eligible is left (bounded, so a job stays short).

    A normal flush takes entries older than ``flush_delay_ms``; an urgent one takes all.
    Raises on a Postgres or Redis outage, so RQ retries the job with backoff.
    """
    ctx = current()
    delay = 0 if urgent else ctx.settings.flush_delay_ms
    totals = FlushReport(shard)
    for _ in range(MAX_BATCHES_PER_JOB):
        report = flush_shard(
            ctx.cache,
            ctx.repo,
            shard,
            cutoff_ms=ctx.cache.server_time_ms() - delay,
            limit=ctx.settings.flush_batch,
            lock_wait_s=URGENT_LOCK_WAIT_S if urgent else 0.0,
        )
        if urgent and not report.locked:
            raise FlushBusy(f"shard {shard} stayed locked for {URGENT_LOCK_WAIT_S}s; retrying")
        _add(totals, report)
        ctx.cache.count(
            rows_flushed=report.written,
            rows_poisoned=len(report.poisoned),
            flushes=int(report.locked),
        )
        if not report.full:
            break
    log.info("flush s%03d: %s", shard, totals)
    return {
        "shard": shard,
        "written": totals.written,
        "acked": totals.acked,
        "poisoned": totals.poisoned,
        "locked": totals.locked,
    }


def _add(totals: FlushReport, report: FlushReport) -> None:
    totals.locked = totals.locked and report.locked
    totals.read += report.read
    totals.written += report.written
    totals.acked += report.acked
    totals.still_dirty = report.still_dirty
    totals.poisoned += report.poisoned


def cleanup_job(
    tenant_id: str, workflow_run_id: str, node_id: str, binding_id: str, agent_id: str
) -> dict[str, Any]:
    """Clean one ``cleaning`` session up on the backend; raise so RQ retries it on its own.

    On the job's last attempt a failure marks the session ``cleaned`` with the error kept.
    """
    ctx = current()
    job = get_current_job()
    last_attempt = job is None or not job.retries_left
    key = SessionKey(tenant_id, workflow_run_id, node_id, binding_id, agent_id)
    cleaner = Cleaner(ctx.cache, ctx.repo, ctx.backend, ctx.settings.cleanup_wait_s)
    result = cleaner.clean(key, last_attempt=last_attempt)
    log.info("cleanup %s: %s", key, result)
    ctx.cache.count(**{f"cleanups_{result.outcome}": 1})
    CLEANUPS.labels(result.outcome).inc()
    return {
        "outcome": result.outcome,
        "cleanup_run_id": result.cleanup_run_id,
        "error": result.error,
    }
