"""Getting a flush job to every shard whose oldest dirty entry is due.

One pass reads every shard's backlog in one pipeline (``ZCARD`` + oldest score) and enqueues
a flush for each shard whose oldest entry is older than ``flush_delay_ms``. Passes run every
``flush_delay_ms / 2``, so an entry waits at most about ``1.5 * flush_delay_ms`` for its job.
The dirty sets live in Redis, so the same pass is also the sweep that re-finds work a crashed
process left behind; unique job ids make overlapping triggers harmless.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from workers.context import WorkerContext
from workers.queues import enqueue_flush

log = logging.getLogger(__name__)

SHARDS_PER_PIPELINE = 512


@dataclass(frozen=True, slots=True)
class TriggerPass:
    """What one pass saw and did."""

    dirty: int
    due_shards: tuple[int, ...]
    enqueued: tuple[int, ...]


def trigger_once(ctx: WorkerContext) -> TriggerPass:
    """Enqueue a flush for every shard with an entry older than the flush delay."""
    now_ms = ctx.cache.server_time_ms()
    cutoff = now_ms - ctx.settings.flush_delay_ms
    shards = list(ctx.cache.keys.all_shards())
    dirty, due = 0, []
    for start in range(0, len(shards), SHARDS_PER_PIPELINE):
        for shard, count, oldest in ctx.cache.shard_backlog(
            shards[start : start + SHARDS_PER_PIPELINE]
        ):
            dirty += count
            if oldest is not None and oldest <= cutoff:
                due.append(shard)
    prefix = ctx.settings.key_prefix
    enqueued = tuple(s for s in due if enqueue_flush(ctx.flush_queue, prefix, s))
    return TriggerPass(dirty, tuple(due), enqueued)


def run_trigger(ctx: WorkerContext, stop: threading.Event) -> None:
    """Run passes until ``stop`` is set; an outage is logged and the loop goes on."""
    interval = max(ctx.settings.flush_delay_ms / 2000, 0.05)
    while not stop.is_set():
        try:
            trigger_once(ctx)
        except Exception:  # the loop must outlive outages; the next pass retries
            log.exception("flush trigger pass failed")
        stop.wait(interval)
