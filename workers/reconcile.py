"""Ending an owner, and the reconciler that finishes any end a crash or a lost key interrupted.

An owner is a workflow run or a conversation; "run" below means either. A row of
``agent_session_owners`` in Postgres is the durable fact that it ended; everything else
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

A conversation goes on after some of its sessions are retired (a turn with another config
snapshot, or idle expiry): :func:`retire_sessions` runs steps 2 and 3 for just those, and
:func:`sweep_conversations` (same thread, same period) finds idle sessions in Postgres and
asks again for cleanups that have not finished.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cache.records import ClosedBy, Owner, SessionKey, SessionStatus, StoredSession
from workers.cleanup import request_cleanup
from workers.context import WorkerContext

log = logging.getLogger(__name__)

OWNERS_PER_PASS = 50


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What one reconciliation of one run did."""

    sessions: int
    moved_to_cleaning: int
    cleanups_requested: int
    already_ended: bool
    settled: bool


def reconcile_owner(ctx: WorkerContext, owner: Owner, outcome: str) -> Reconciled:
    """Bring an ended owner's Redis state in line with its end (idempotent)."""
    cache = ctx.cache
    ended = cache.end_owner(owner, outcome)
    in_postgres = ctx.repo.unsettled(owner)
    keys = sorted({*ended.keys, *in_postgres}, key=SessionKey.sort_key)
    _fill_missing(ctx, keys)
    _catch_up(ctx, in_postgres)
    moved = cache.begin_cleanup(owner, keys)
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
        _flush_now(ctx, owner)
    done = settled == len(keys)
    if done:
        ctx.repo.settle_owner(owner)
        cache.settle_owner(owner)
    return Reconciled(len(keys), moved, requested, ended.already_ended, done)


def reconcile_once(ctx: WorkerContext, limit: int = OWNERS_PER_PASS) -> list[Reconciled]:
    """Reconcile up to ``limit`` unsettled ended runs whose next check is due."""
    due = ctx.repo.claim_due_owners(limit=limit, recheck_after_s=ctx.settings.reconcile_interval_s)
    done = []
    for run in due:
        try:
            end = ctx.repo.end_of(run)
            if end is not None:
                done.append(reconcile_owner(ctx, run, end.outcome))
        except Exception:  # one run that keeps failing must not hold the others
            log.exception(
                "reconciling %s failed; it is checked again in %ss",
                run,
                ctx.settings.reconcile_interval_s,
            )
    return done


@dataclass(frozen=True, slots=True)
class RetiredSessions:
    """What one retirement did."""

    moved_to_cleaning: int
    cleanups_requested: int


def retire_sessions(
    ctx: WorkerContext,
    owner: Owner,
    keys: Sequence[SessionKey],
    closed_by: ClosedBy,
    *,
    idle_s: float | None = None,
) -> RetiredSessions:
    """Retire some sessions of an owner that goes on (a conversation's ``config_change`` or
    ``idle``): ``active`` → ``cleaning`` and a cleanup job each, as an owner's end does for
    all of them. Sessions Redis lost are filled back from Postgres first. Idempotent. With
    ``idle_s``, only sessions idle that long by Redis's own ``updated_at`` and clock (in the
    script)."""
    keys = sorted(set(keys), key=SessionKey.sort_key)
    _fill_missing(ctx, keys)
    moved = ctx.cache.begin_cleanup(owner, keys, closed_by=closed_by, idle_s=idle_s)
    requested = _request_cleanups(ctx, keys)
    if moved:
        _flush_now(ctx, owner)
    return RetiredSessions(moved, requested)


def sweep_conversations(ctx: WorkerContext, limit: int = OWNERS_PER_PASS) -> SweptConversations:
    """Retire conversation sessions idle for ``conversation_idle_s`` (Postgres names the
    candidates; Redis, which may hold a newer save, decides in ``begin_cleanup`` itself, so a
    save racing the sweep wins; a session waiting for human input is never idle), and request
    the cleanup again of retired sessions whose cleanup has not finished within
    ``reconcile_grace_s``."""
    settings = ctx.settings
    now = redis_now(ctx)
    idle = ctx.repo.idle_conversation_keys(
        before=now - timedelta(seconds=settings.conversation_idle_s), limit=limit
    )
    retired = requested = 0
    for owner, keys in _by_owner(idle).items():
        done = retire_sessions(ctx, owner, keys, ClosedBy.IDLE, idle_s=settings.conversation_idle_s)
        retired += done.moved_to_cleaning
        requested += done.cleanups_requested
    stalled = ctx.repo.stalled_conversation_cleanups(
        before=now - timedelta(seconds=settings.reconcile_grace_s), limit=limit
    )
    _fill_missing(ctx, stalled)
    requested += _request_cleanups(ctx, stalled)
    return SweptConversations(retired, requested)


@dataclass(frozen=True, slots=True)
class SweptConversations:
    """What one pass over conversations did."""

    retired: int
    """Idle sessions that went from ``active`` to ``cleaning``."""
    cleanups_requested: int
    """Cleanup jobs requested (for those, and for stalled ones)."""


def redis_now(ctx: WorkerContext) -> datetime:
    """Redis's clock: what every stored ``updated_at`` was stamped with, so the times the
    sweep compares come from one clock whatever the hosts' clocks say."""
    return datetime.fromtimestamp(ctx.cache.server_time_ms() / 1000, UTC)


def _by_owner(keys: Iterable[SessionKey]) -> dict[Owner, list[SessionKey]]:
    grouped: dict[Owner, list[SessionKey]] = {}
    for key in keys:
        grouped.setdefault(key.owner, []).append(key)
    return grouped


def _request_cleanups(ctx: WorkerContext, keys: Sequence[SessionKey]) -> int:
    """A cleanup job for every one of ``keys`` that is ``cleaning`` in Redis and has none."""
    names = [ctx.cache.keys.session(key) for key in keys]
    records = ctx.cache.read_many(names) if names else []
    requested = 0
    for key, name, record in zip(keys, names, records, strict=True):
        if isinstance(record, StoredSession) and record.status is SessionStatus.CLEANING:
            requested += _request_cleanup(ctx, key, name)
    return requested


def _fill_missing(ctx: WorkerContext, keys: list[SessionKey]) -> None:
    """Bring back from Postgres the sessions Redis no longer has (expired or lost keys)."""
    for key in ctx.cache.missing(keys):
        row = ctx.repo.get(key)
        if row is not None:
            ctx.cache.fill(row)


def _catch_up(ctx: WorkerContext, in_postgres: dict[SessionKey, int]) -> None:
    """Replace a clean Redis copy older than the Postgres row (Redis went back in time behind
    what reached Postgres) with the row, so the owner's end reaches what Postgres holds: a
    stale ``cleaned`` copy would pass for settled while the row stays ``active``."""
    keys = list(in_postgres)
    names = [ctx.cache.keys.session(key) for key in keys]
    held = ctx.cache.read_fields(names, ("version", "flushed_version"))
    for key, found in zip(keys, held, strict=True):
        if not isinstance(found, tuple) or found[1][0] is None:
            continue
        version = int(found[1][0])
        if version < in_postgres[key] and int(found[1][1] or -1) >= version:
            row = ctx.repo.get(key)
            if row is not None and ctx.cache.fill(row, behind=True):
                log.warning(
                    "%s: Redis held v%s, behind Postgres's v%s; brought up to Postgres's row",
                    key,
                    version,
                    row.version,
                )


def _request_cleanup(ctx: WorkerContext, key: SessionKey, name: str) -> bool:
    settings = ctx.settings
    return request_cleanup(
        ctx.cleanup_queue, settings.key_prefix, name, key, settings.cleanup_attempts
    )


def _flush_now(ctx: WorkerContext, owner: Owner) -> None:
    """The end must stick in Postgres: flush the owner's shard urgently (best effort)."""
    shard = ctx.cache.keys.shard_of_owner(owner)
    try:
        ctx.request_flush(shard)
    except Exception as exc:  # the trigger flushes it once it is due
        log.warning("could not request an urgent flush of shard %s: %s", shard, exc)
