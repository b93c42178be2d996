"""What ``agent-sessions inspect`` and ``stats`` show, as plain dicts (JSON-ready).

Everything is read-only: Redis hashes and sorted sets, the Postgres row, RQ queue sizes.
"""

from __future__ import annotations

import time
from typing import Any

from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from agent_sessions.health import pool_state
from cache.records import Owner, OwnerType, SessionKey, StoredSession
from cache.snapshot_json import to_raw
from workers.context import WorkerContext

MAX_POISON_LISTED = 50


def snapshot_summary(session: StoredSession, *, full: bool) -> dict[str, Any]:
    """Layer names, states and stored sizes (each state's JSON); the whole snapshot and
    specs with ``full``."""
    frame = to_raw(session.data.snapshot)  # states as their stored JSON text, not decoded
    summary: dict[str, Any] = {
        "schema_version": frame.schema_version,
        "layers": [
            {
                "name": layer.name,
                "lifecycle_state": layer.lifecycle_state.value,
                "bytes": memoryview(layer.runtime_state).nbytes,
            }
            for layer in frame.layers
        ],
        "spec_names": [spec.name for spec in session.layer_specs],
    }
    if full:
        summary["snapshot"] = session.snapshot.to_dict()
        summary["layer_specs"] = [spec.to_dict() for spec in session.layer_specs]
    return summary


def _record(session: StoredSession) -> dict[str, Any]:
    data = session.data
    return {
        "status": session.status.value,
        "closed_by": session.closed_by.value if session.closed_by else None,
        "version": session.version,
        "flushed_version": session.flushed_version,
        "agent_config_snapshot_id": data.agent_config_snapshot_id,
        "backend_run_id": data.backend_run_id,
        "node_execution_id": data.node_execution_id,
        "pending_form_id": data.pending_form_id,
        "pending_tool_call_id": data.pending_tool_call_id,
        "created_at": session.created_at,
        "updated_at": session.updated_at,
        "cleaned_at": session.cleaned_at,
        "cleanup_error": session.cleanup_error,
        "lineage": session.lineage,
    }


def inspect_session(ctx: WorkerContext, key: SessionKey, *, full: bool) -> dict[str, Any]:
    """One session in Redis (with TTL, dirtiness and poison reason) beside its Postgres row."""
    cache = ctx.cache
    name = cache.keys.session(key)
    shard = cache.keys.shard_of_key(key)
    record = cache.load(key).record
    row = ctx.repo.get(key)
    redis_side: dict[str, Any] | None = None
    if record is not None:
        dirty_since = cache.client.zscore(cache.keys.dirty(shard), name)
        redis_side = {
            **_record(record),
            "dirty": dirty_since is not None,
            "dirty_since_ms": int(dirty_since) if dirty_since is not None else None,
            "ttl_s": _ttl(ctx, name),
            "poison": cache.poison(shard).get(name),
            "snapshot": snapshot_summary(record, full=full),
        }
    return {
        "key": name,
        "owner_type": key.owner_type.value,
        "shard": shard,
        "redis": redis_side,
        "postgres": None
        if row is None
        else {**_record(row), "snapshot": snapshot_summary(row, full=full)},
    }


def _ttl(ctx: WorkerContext, name: str) -> int | None:
    pttl = int(ctx.cache.client.pttl(name))
    return None if pttl < 0 else pttl // 1000


def inspect_run(ctx: WorkerContext, owner: Owner) -> dict[str, Any]:
    """An owner's marker (a workflow run's or a conversation's) and every session of it,
    Redis beside Postgres."""
    cache = ctx.cache
    in_redis = {key: cache.load(key).record for key in cache.owner_sessions(owner)}
    in_pg = {row.key: row for row in ctx.repo.list_owner(owner)}
    sessions = []
    for key in sorted(set(in_redis) | set(in_pg), key=SessionKey.sort_key):
        redis_rec, pg_rec = in_redis.get(key), in_pg.get(key)
        sessions.append(
            {
                **_member_ids(key),
                "redis": None if redis_rec is None else _brief(redis_rec),
                "postgres": None if pg_rec is None else _brief(pg_rec),
            }
        )
    end = ctx.repo.end_of(owner)
    return {
        "run": cache.owner_state(owner),
        "ended_in_postgres": None
        if end is None
        else {"outcome": end.outcome, "ended_at": end.ended_at, "settled": end.settled},
        "shard": cache.keys.shard_of_owner(owner),
        "sessions": sessions,
    }


def _member_ids(key: SessionKey) -> dict[str, str]:
    """The IDs that tell the owner's sessions apart."""
    if key.owner_type is OwnerType.CONVERSATION:
        return {
            "binding_id": key.binding_id,
            "agent_id": key.agent_id,
            "agent_config_snapshot_id": key.config_id,
        }
    return {"node_id": key.node_id, "binding_id": key.binding_id, "agent_id": key.agent_id}


def _brief(session: StoredSession) -> dict[str, Any]:
    return {
        "status": session.status.value,
        "version": session.version,
        "dirty": session.dirty,
        "layers": list(session.data.snapshot.layer_names()),
    }


def stats(ctx: WorkerContext) -> dict[str, Any]:
    """Backlog per shard and in total, oldest dirty age, poison, cleanups, queues, counters."""
    cache = ctx.cache
    shards = list(cache.keys.all_shards())
    backlog = cache.shard_backlog(shards)
    now_ms = cache.server_time_ms()
    oldest = [since for _, _, since in backlog if since is not None]
    poison = {}
    for shard in cache.poison_sizes(shards):
        for name, reason in list(cache.poison(shard).items())[:MAX_POISON_LISTED]:
            poison[name] = reason
    return {
        "dirty_total": sum(count for _, count, _ in backlog),
        "dirty_by_shard": {str(shard): count for shard, count, _ in backlog if count},
        "oldest_dirty_age_s": round((now_ms - min(oldest)) / 1000, 3) if oldest else None,
        "poison": poison,
        "postgres_sessions_by_status": ctx.repo.count_by_status(),
        "postgres_sessions_by_owner": ctx.repo.count_by_owner_and_status(),
        "ended_runs_not_settled": ctx.repo.count_unsettled_owners(),
        "cleanups_given_up": ctx.repo.count_cleanup_failures(),
        "queues": queue_depths(ctx),
        "pool": pool_state(ctx),
        "counters": cache.counters(),
    }


def queue_depths(ctx: WorkerContext) -> dict[str, dict[str, int]]:
    """Queued, running, scheduled (retry backoff) and failed jobs per queue.

    Counted without RQ's ``count``, which first cleans the registry up (moves abandoned jobs
    to the failed registry, drops expired entries): a look must write nothing. Entries whose
    time has passed, which that clean-up would remove, are not counted."""
    depths = {}
    now = time.time()
    for queue in (ctx.flush_queue, ctx.cleanup_queue):
        redis = queue.connection
        depths[queue.name] = {
            "queued": queue.count,
            "started": redis.zcount(StartedJobRegistry(queue=queue).key, now, "+inf"),
            "scheduled": redis.zcard(
                ScheduledJobRegistry(queue=queue).key  # type: ignore[no-untyped-call]
            ),
            "failed": redis.zcount(FailedJobRegistry(queue=queue).key, now, "+inf"),
        }
    return depths
