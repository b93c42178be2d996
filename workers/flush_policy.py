"""When a dirty session reaches Postgres, and how long each part of getting it there may take.

The one place to read or change the write-behind's policy:

* **Which change flushes how** (:func:`flush_after`): a succeeded run's save waits out
  ``ASC_FLUSH_DELAY_MS``, so that a loop's saves coalesce into one row write; a pause, a
  retire and an owner's end are flushed at once (an urgent job at the front of the queue that
  takes every dirty entry of the shard), and a pause with ``durable`` is written to Postgres
  before ``finish`` returns.
* **The trigger** passes every ``ASC_FLUSH_DELAY_MS / 2`` (:func:`trigger_interval_s`) and
  requests a job for every shard whose oldest entry is due; the reconciler of ended owners
  runs every :func:`reconcile_period_s`.
* **A flush job** flushes the shards the trigger grouped into it (:func:`flush_groups`: a
  loop's few rows over many shards go to one job), at most :data:`MAX_BATCHES_PER_JOB`
  batches of ``ASC_FLUSH_BATCH`` per shard, retries an outage in itself after
  :data:`RETRY_PAUSES_S`, then fails; after a Postgres outage no job is requested for
  :data:`POSTGRES_BACKOFF_MS`.
* **The bounds** operators watch: :func:`delivery_bound_ms` (how old the oldest dirty session
  of a healthy system can be) and :func:`trigger_stale_after_ms` (a trigger silent longer is
  not alive); ``agent-sessions health`` and ``audit`` judge by them.

Requests themselves go through ``WorkerContext.request_flush`` (``workers.context``).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Final

from cache.settings import Settings

FLUSH_JOB_TIMEOUT_S: Final = 60
"""A job runs at most ``MAX_BATCHES_PER_JOB`` batches plus short in-job retries."""
FLUSH_FAILURE_TTL_S: Final = 60
"""A failed flush job is kept this long for ``rq info``; the trigger has re-requested by then."""
FLUSH_QUEUED_TTL_S: Final = 300
"""A job still queued after this long is dropped by RQ; the trigger has requested another."""
POSTGRES_BACKOFF_MS: Final = 2000
"""After a flush job found Postgres unavailable, no new flush job is requested for this long."""
MAX_BATCHES_PER_JOB: Final = 20
"""Batches one job flushes of one shard before it leaves the rest to the next request."""
SHARDS_PER_JOB: Final = 64
"""The most shards the trigger hands one flush job."""
BATCHES_PER_GROUPED_JOB: Final = 2
"""The trigger starts another job once a job's shards hold this many batches: a loop's
backlog, a few rows over many shards, goes to one job (a job's own cost, mostly RQ's, is
then paid once per pass, not once per shard), and a deep backlog is spread over the
workers."""
URGENT_LOCK_WAIT_S: Final = 5.0
"""How long an urgent flush waits for the shard's lock (a drain waits as long)."""
RETRY_PAUSES_S: Final = (0.1, 0.3, 1.0)
"""In-job retries of a flush that hit an outage: short, so a job never holds a worker long."""


class FlushWhen(StrEnum):
    """How soon a change of a session must reach Postgres."""

    DELAYED = "delayed"
    """Within the delay, coalesced with the session's next saves."""
    URGENT = "urgent"
    """Now: an urgent job at the front of the queue."""
    DURABLE = "durable"
    """Before the call returns: written to Postgres in the caller's thread."""


def flush_after(status: str, *, durable: bool = False) -> FlushWhen:
    """How a node's exit with ``status`` is flushed: a pause may last days and a retire must
    stick, so both go now; a pause goes before ``finish`` returns when ``durable``."""
    if status == "succeeded":
        return FlushWhen.DELAYED
    if status == "paused" and durable:
        return FlushWhen.DURABLE
    return FlushWhen.URGENT


def flush_groups(backlog: Sequence[tuple[int, int]], batch: int) -> list[list[int]]:
    """Due shards, as ``(shard, dirty count)``, grouped into the jobs the trigger requests:
    a group is closed once it holds :data:`BATCHES_PER_GROUPED_JOB` batches or
    :data:`SHARDS_PER_JOB` shards (a deep shard ends its group). The job flushes its shards
    in rounds of one batch (:func:`workers.flush.flush_shards`), so a group's size bounds
    the job's length, never one statement or the worker's memory."""
    groups: list[list[int]] = []
    group: list[int] = []
    rows = 0
    for shard, count in backlog:
        if group and (rows >= BATCHES_PER_GROUPED_JOB * batch or len(group) >= SHARDS_PER_JOB):
            groups.append(group)
            group, rows = [], 0
        group.append(shard)
        rows += count
    if group:
        groups.append(group)
    return groups


def pending_ttl_ms(settings: Settings) -> int:
    """The longest a flush request's marker can hold its shard: the job's queue TTL (the
    marker holds only while its job waits in the queue, see ``workers.queues``)."""
    return max(settings.flush_delay_ms, FLUSH_QUEUED_TTL_S * 1000)


def trigger_interval_s(settings: Settings) -> float:
    """Between two passes of the flush trigger: half the delay, at least 50 ms."""
    return max(settings.flush_delay_ms / 2000, 0.05)


def reconcile_period_s(settings: Settings) -> float:
    """How often the trigger process runs a reconciliation pass of ended owners."""
    return min(max(settings.reconcile_interval_s / 2, 0.5), 10.0)


def trigger_stale_after_ms(settings: Settings) -> int:
    """A trigger that has not passed for this long is not alive (it passes every
    ``flush_delay_ms / 2``): 3 x ``flush_delay_ms``, at least one second."""
    return max(3 * settings.flush_delay_ms, 1000)


def delivery_bound_ms(settings: Settings) -> int:
    """How old the oldest dirty session of a healthy system can be: a flush is requested
    within ``1.5 x flush_delay_ms`` of a session becoming dirty, a killed flusher holds its
    shard ``flush_lock_ttl_s`` more, and the rest of ``3 x flush_delay_ms`` is for the
    flush itself and a worker to take it (README, Delivery bound)."""
    return 3 * settings.flush_delay_ms + int(settings.flush_lock_ttl_s * 1000)
