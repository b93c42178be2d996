"""The trigger: the reconciler that gets a flush job to every shard whose oldest entry is due.

One pass reads every shard's backlog in one pipeline (``ZCARD`` + oldest score) and requests
a flush for each shard whose oldest entry is older than ``flush_delay_ms``. Passes run every
``flush_delay_ms / 2``. Dirty state lives in Redis, not in any job, so the same pass is also
the sweep that re-finds work a crashed process, a lost job or a killed worker left behind:
a request is only skipped while a job of the shard waits in the queue (its pending marker
names a job RQ still has queued, on the list: ``workers.queues.claim_flush_marker``). So an
entry that is due gets a job within about ``flush_delay_ms / 2`` whatever RQ did to the
previous one (or is flushed by the waiting job when a worker takes it), and within
``flush_lock_ttl_s`` more if a killed flusher held its shard.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cache.errors import AgentSessionsError
from workers.context import WorkerContext
from workers.flush_policy import (
    flush_groups,
    pending_ttl_ms,
    reconcile_period_s,
    trigger_interval_s,
)
from workers.queues import backing_off, request_flushes
from workers.reconcile import reconcile_once, sweep_conversations

log = logging.getLogger(__name__)

SHARDS_PER_PIPELINE = 512
RECONCILER_JOIN_S = 5.0
"""On a stop, how long the trigger waits for a reconciliation pass to end (the pool kills
it after its stop bound anyway; every step of a pass is safe to interrupt)."""


def trigger_name(pid: int | None = None) -> str:
    """How the trigger of process ``pid`` (default: this one) is recorded in
    ``<prefix>:triggers``: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


@dataclass(frozen=True, slots=True)
class TriggerPass:
    """What one pass saw and did."""

    dirty: int
    due_shards: tuple[int, ...]
    enqueued: tuple[int, ...]
    at_ms: int
    """When the pass read the backlog (Redis time, ms)."""
    backing_off: bool = False


def due_shards(ctx: WorkerContext, now_ms: int) -> tuple[int, tuple[tuple[int, int], ...]]:
    """``(dirty sessions in all shards, (shard, dirty count) of each shard whose oldest entry
    is older than the delay)``."""
    cutoff = now_ms - ctx.settings.flush_delay_ms
    shards = list(ctx.cache.keys.all_shards())
    dirty, due = 0, []
    for start in range(0, len(shards), SHARDS_PER_PIPELINE):
        for shard, count, oldest in ctx.cache.shard_backlog(
            shards[start : start + SHARDS_PER_PIPELINE]
        ):
            dirty += count
            if oldest is not None and oldest <= cutoff:
                due.append((shard, count))
    return dirty, tuple(due)


def trigger_once(ctx: WorkerContext) -> TriggerPass:
    """Request a flush for every due shard (none while Postgres is in backoff): the due
    shards are grouped into jobs (``flush_policy.flush_groups``), and a shard whose job
    still waits is left to it."""
    now_ms = ctx.cache.server_time_ms()
    dirty, backlog = due_shards(ctx, now_ms)
    due = tuple(shard for shard, _ in backlog)
    prefix = ctx.settings.key_prefix
    if due and backing_off(ctx.queue_redis, prefix):
        return TriggerPass(dirty, due, (), now_ms, backing_off=True)
    pending_ms = pending_ttl_ms(ctx.settings)
    enqueued: list[int] = []
    for group in flush_groups(backlog, ctx.settings.flush_batch):
        enqueued += request_flushes(ctx.flush_queue, prefix, group, pending_ms=pending_ms)
    return TriggerPass(dirty, due, tuple(enqueued), now_ms)


def run_trigger(ctx: WorkerContext, stop: threading.Event) -> None:
    """Run passes until ``stop`` is set; an outage is logged and the loop goes on.

    Flush passes every ``flush_delay_ms / 2``. Reconciliation passes of ended owners and
    the sweep of idle conversations (:mod:`workers.reconcile`) every
    :func:`reconcile_period_s`, on a thread of their own:
    a pass after a Redis loss reads and fills many sessions, and the flush passes must not
    wait for it (the delivery bound in the README).

    Every pass that succeeded is recorded in ``<prefix>:triggers`` (``agent-sessions stats``
    and ``health`` read it); the record goes when the trigger stops.
    """
    reconciler = threading.Thread(
        target=_reconcile_loop, args=(ctx, stop), name="asc-reconciler", daemon=True
    )
    reconciler.start()
    interval = trigger_interval_s(ctx.settings)
    name = trigger_name()
    try:
        while not stop.is_set():
            _logged(lambda ctx: _pass_and_record(ctx, name), ctx, "flush trigger pass")
            stop.wait(interval)
    except BaseException:  # a signal (KeyboardInterrupt): stop the reconciler too
        stop.set()
        raise
    finally:
        reconciler.join(timeout=RECONCILER_JOIN_S)
        with contextlib.suppress(AgentSessionsError):
            ctx.cache.forget_trigger(name)


def _pass_and_record(ctx: WorkerContext, name: str) -> None:
    done = trigger_once(ctx)
    ctx.cache.note_trigger_pass(name, done.at_ms)


def _reconcile_loop(ctx: WorkerContext, stop: threading.Event) -> None:
    while not stop.is_set():
        _logged(reconcile_once, ctx, "reconciliation pass")
        _logged(sweep_conversations, ctx, "conversation sweep")
        stop.wait(reconcile_period_s(ctx.settings))


def _logged(step: Callable[[WorkerContext], object], ctx: WorkerContext, what: str) -> None:
    try:
        step(ctx)
    except Exception:  # the loop must outlive outages; the next pass retries
        log.exception("%s failed", what)
