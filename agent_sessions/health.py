"""Is the write-behind alive? What ``agent-sessions stats`` shows of the worker pools, and
what ``agent-sessions health`` decides from it (read-only, JSON-ready).

Every flush trigger records its passes in ``<prefix>:triggers`` (``host:pid`` → Redis time),
and RQ registers its workers; ages are Redis time minus Redis time, so no host's clock is
compared with another's.
"""

from __future__ import annotations

import socket
from typing import Any

from rq import Queue, Worker, worker_registration
from rq.serializers import JSONSerializer
from rq.worker import BaseWorker

from workers.context import WorkerContext
from workers.flush_policy import delivery_bound_ms, trigger_stale_after_ms


def pool_state(ctx: WorkerContext) -> dict[str, Any]:
    """The flush triggers with the age of their last pass, and the RQ workers of the prefix's
    queues (name, state, current job, last heartbeat as RQ records it)."""
    now_ms = ctx.cache.server_time_ms()
    triggers = {
        name: round((now_ms - at_ms) / 1000, 3)
        for name, at_ms in sorted(ctx.cache.trigger_passes().items())
    }
    workers = [
        {
            "name": worker.name,
            "state": worker.get_state(),
            "current_job": worker.get_current_job_id(),
            "last_heartbeat": worker.last_heartbeat,
        }
        for worker in registered_workers(ctx.flush_queue)
    ]
    return {"trigger_last_pass_age_s": triggers, "workers": sorted(workers, key=_by_name)}


def registered_workers(queue: Queue) -> list[BaseWorker]:
    """The RQ workers registered for ``queue`` whose record still exists. Unlike RQ's
    ``Worker.all``, a dead worker's left-over registration is skipped, not removed."""
    connection = queue.connection
    found = []
    for key in sorted(worker_registration.get_keys(queue=queue)):
        if connection.exists(key):
            worker = Worker.find_by_key(key, connection=connection, serializer=JSONSerializer)
            if worker is not None:
                found.append(worker)
    return found


def _by_name(worker: dict[str, Any]) -> str:
    return str(worker["name"])


def health(ctx: WorkerContext, *, local: bool = False) -> dict[str, Any]:
    """Whether the write-behind is alive: a flush trigger passed within
    :func:`trigger_stale_after_ms`, and (unless ``local``) the oldest dirty session is
    within :func:`delivery_bound_ms`. ``local`` looks only at this host's triggers, for a
    liveness probe of one pool; the backlog, which a Postgres outage grows without any
    process being at fault, is then reported but not judged."""
    settings = ctx.settings
    now_ms = ctx.cache.server_time_ms()
    passes = ctx.cache.trigger_passes()
    if local:
        host = socket.gethostname()
        passes = {name: at for name, at in passes.items() if name.rpartition(":")[0] == host}
    trigger_age_ms = now_ms - max(passes.values()) if passes else None
    oldest = [since for _, _, since in ctx.cache.shard_backlog(list(ctx.cache.keys.all_shards()))]
    dirty_since = [since for since in oldest if since is not None]
    oldest_age_ms = now_ms - min(dirty_since) if dirty_since else None
    problems = _problems(
        trigger_age_ms,
        trigger_stale_after_ms(settings),
        None if local else oldest_age_ms,
        delivery_bound_ms(settings),
        where=f"on {socket.gethostname()} " if local else "",
    )
    return {
        "healthy": not problems,
        "problems": problems,
        "trigger_last_pass_age_s": _seconds(trigger_age_ms),
        "trigger_stale_after_s": trigger_stale_after_ms(settings) / 1000,
        "oldest_dirty_age_s": _seconds(oldest_age_ms),
        "delivery_bound_s": delivery_bound_ms(settings) / 1000,
        "local": local,
    }


def _problems(
    trigger_age_ms: int | None,
    stale_ms: int,
    oldest_age_ms: int | None,
    bound_ms: int,
    *,
    where: str,
) -> list[str]:
    problems = []
    if trigger_age_ms is None:
        problems.append(f"no flush trigger {where}has passed within the last hour")
    elif trigger_age_ms > stale_ms:
        problems.append(
            f"the last flush trigger pass {where}was {trigger_age_ms / 1000:.1f}s ago "
            f"(alive means within {stale_ms / 1000:.1f}s): is a worker pool running?"
        )
    if oldest_age_ms is not None and oldest_age_ms > bound_ms:
        problems.append(
            f"the oldest dirty session has waited {oldest_age_ms / 1000:.1f}s for Postgres, "
            f"over the delivery bound of {bound_ms / 1000:.1f}s"
        )
    return problems


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else round(ms / 1000, 3)
