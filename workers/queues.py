"""RQ queues and flush requests. JSON serializer only: no pickle anywhere.

Delivery never depends on RQ's job ids. Every flush job gets a fresh id (RQ 3.0.0's unique
ids could be orphaned: ``Queue.fetch_job`` runs ``Queue.remove`` (LREM) after a miss, which
can take a concurrent unique enqueue off the list and leave its hash ``queued`` forever; an
abandoned or retried job holds its id for minutes). What keeps the queue small instead is a
*pending marker* per shard in the queue's Redis: a request sets it (``SET NX PX``) and
enqueues a job only if it was not set; the job clears it as soon as it starts, so a save
made after the job read its batch always gets a job of its own. A marker holds only while
its job really waits: RQ's hash of it says ``queued`` and its id is on the queue's list.
A job lost in any way (a crash between marker and enqueue, a flushed queue, a worker killed
between taking the job and starting it, a job RQ dropped after its queue TTL) leaves a
marker the next request takes over at once; and the marker's TTL (``flush_policy.pending_ttl_ms``,
the job's queue TTL) bounds it whatever happens. So busy workers never make the trigger
queue a job per shard per pass, and the trigger requests again while entries stay dirty.
Duplicate jobs are harmless: the shard lock serializes them and the version fence makes a
repeated write a no-op.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import Any, cast

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from cache import keys
from cache.errors import QueueError
from cache.settings import Settings
from workers.flush_policy import (
    FLUSH_FAILURE_TTL_S,
    FLUSH_JOB_TIMEOUT_S,
    FLUSH_QUEUED_TTL_S,
    POSTGRES_BACKOFF_MS,
)

FLUSH_JOB = "workers.jobs.flush_job"


class QueueUnavailable(QueueError):
    """The queue's Redis could not be reached or refused the request."""


class FlushRequest(StrEnum):
    """What a flush request did."""

    ENQUEUED = "enqueued"
    """A new job was queued for the shard."""
    PENDING = "pending"
    """A job of the shard that has not started yet will flush this save too."""


def queue_connection(settings: Settings) -> redis.Redis:
    """RQ needs a standalone Redis: ``RQ_REDIS_URL``, or ``REDIS_URL`` when unset."""
    return redis.Redis.from_url(
        settings.queue_redis_url,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
    )


def queue_names(prefix: str) -> list[str]:
    """The key prefix's queues, flush first: ``asc-flush``, ``asc-cleanup`` by default.

    Queues are per prefix because jobs carry only IDs: a pool serving another prefix must
    never run them against its own keys.
    """
    return [f"{prefix}-flush", f"{prefix}-cleanup"]


def flush_queue(connection: redis.Redis, prefix: str) -> Queue:
    return Queue(queue_names(prefix)[0], connection=connection, serializer=JSONSerializer)


def cleanup_queue(connection: redis.Redis, prefix: str) -> Queue:
    return Queue(queue_names(prefix)[1], connection=connection, serializer=JSONSerializer)


@contextmanager
def translate_queue_errors(what: str) -> Iterator[None]:
    """Re-raise the queue Redis's errors as :class:`QueueUnavailable`, from the original."""
    try:
        yield
    except redis.RedisError as exc:
        raise QueueUnavailable(f"{what}: the queue's Redis failed: {exc}") from exc


def request_flush(
    queue: Queue, prefix: str, shard: int, *, urgent: bool = False, pending_ms: int
) -> FlushRequest:
    """Make sure a flush job of ``shard`` that has not started yet exists.

    ``urgent`` jobs go to the front of the queue and flush every dirty entry, not only those
    older than the flush delay. Raises :class:`QueueUnavailable`; nothing is left behind then.
    """
    kind = "u" if urgent else "n"
    job_id = f"{prefix}-flush-s{shard:03d}-{kind}-{secrets.token_hex(6)}"
    marker = keys.flush_pending(prefix, shard, urgent=urgent)
    with translate_queue_errors(f"requesting a flush of shard {shard}"):
        if not claim_flush_marker(queue, marker, job_id, pending_ms):
            return FlushRequest.PENDING
        try:
            _enqueue_flush(queue, job_id, shard, urgent=urgent)
        except BaseException:
            clear_pending(queue.connection, marker, job_id)
            raise
    return FlushRequest.ENQUEUED


def request_flushes(
    queue: Queue, prefix: str, shards: Sequence[int], *, pending_ms: int
) -> list[int]:
    """One (not urgent) flush job for those of ``shards`` that have none waiting; the shards
    it was queued for (none: every shard's job waits already). Each shard's pending marker
    names the one job. Raises :class:`QueueUnavailable`; nothing is left behind then."""
    job_id = f"{prefix}-flush-n{len(shards)}-{secrets.token_hex(6)}"
    markers = {shard: keys.flush_pending(prefix, shard, urgent=False) for shard in shards}
    with translate_queue_errors(f"requesting a flush of {len(shards)} shards"):
        claimed = claim_flush_markers(queue, list(markers.values()), job_id, pending_ms)
        mine = [shard for shard, ok in zip(shards, claimed, strict=True) if ok]
        if not mine:
            return []
        try:
            _enqueue_flush(queue, job_id, mine, urgent=False)
        except BaseException:
            for shard in mine:
                clear_pending(queue.connection, markers[shard], job_id)
            raise
    return mine


def _enqueue_flush(queue: Queue, job_id: str, shards: int | list[int], *, urgent: bool) -> None:
    queue.enqueue(
        FLUSH_JOB,
        shards,
        urgent,
        job_id=job_id,
        at_front=urgent,
        job_timeout=FLUSH_JOB_TIMEOUT_S,
        result_ttl=0,
        failure_ttl=FLUSH_FAILURE_TTL_S,
        ttl=FLUSH_QUEUED_TTL_S,
    )


def claim_flush_markers(
    queue: Queue, markers: Sequence[str], job_id: str, ttl_ms: int
) -> list[bool]:
    """:func:`claim_flush_marker` of many markers: the free ones in one round trip, each
    taken one afterwards only if its job no longer waits."""
    with queue.connection.pipeline(transaction=False) as pipe:
        for marker in markers:
            pipe.set(marker, job_id, nx=True, px=ttl_ms)
        set_now: list[Any] = pipe.execute()
    return [
        bool(ok) or claim_flush_marker(queue, marker, job_id, ttl_ms)
        for marker, ok in zip(markers, set_now, strict=True)
    ]


def claim_marker(
    connection: redis.Redis,
    marker: str,
    job_id: str,
    ttl_ms: int,
    holds: Callable[[str], bool] | None = None,
) -> bool:
    """Set ``marker`` to ``job_id`` unless it names another job that still ``holds`` it
    (default: RQ still has the job's hash).

    A marker whose job no longer holds it (the queue's Redis lost its jobs, or a crash came
    between marker and enqueue) is stale and taken over at once instead of at its TTL. At
    worst two requests both take it and two jobs run: harmless.
    """
    if connection.set(marker, job_id, nx=True, px=ttl_ms):
        return True
    held = cast(bytes | None, connection.get(marker))
    if held is None:
        return bool(connection.set(marker, job_id, nx=True, px=ttl_ms))
    holder = held.decode(errors="replace")
    if holds(holder) if holds is not None else connection.exists(Job.key_for(holder)):
        return False
    clear_pending(connection, marker, holder)
    return bool(connection.set(marker, job_id, nx=True, px=ttl_ms))


def claim_flush_marker(queue: Queue, marker: str, job_id: str, ttl_ms: int) -> bool:
    """:func:`claim_marker` for a flush job: the holder holds only while it waits in
    ``queue`` (a started job has cleared its marker; one that is not on the list will never
    start)."""
    return claim_marker(
        queue.connection, marker, job_id, ttl_ms, holds=lambda held: waiting(queue, held)
    )


def waiting(queue: Queue, job_id: str) -> bool:
    """Whether ``job_id`` waits in ``queue``: its hash says ``queued`` and it is on the
    list (RQ 3.0 keeps a job's status in its hash's ``status`` field)."""
    with queue.connection.pipeline(transaction=False) as pipe:
        pipe.hget(Job.key_for(job_id), "status")
        pipe.lpos(queue.key, job_id)
        status, position = pipe.execute()
    return bool(status == b"queued" and position is not None)


def clear_pending(connection: redis.Redis, marker: str, job_id: str) -> None:
    """Delete ``marker`` if it still names ``job_id`` (a newer request's marker stays)."""
    with connection.pipeline() as pipe:
        try:
            pipe.watch(marker)  # type: ignore[no-untyped-call]
            if pipe.get(marker) != job_id.encode():
                return
            pipe.multi()
            pipe.delete(marker)
            pipe.execute()
        except redis.WatchError:
            return  # replaced meanwhile by a newer request: leave it


def back_off(connection: redis.Redis, prefix: str, why: str) -> None:
    """Postgres is unavailable: pause flush requests for :data:`POSTGRES_BACKOFF_MS`.

    Without it every due shard would get a job every trigger pass, each failing after its
    in-job retries, while Postgres is down. The pause is short, so flushing resumes within
    it once Postgres is back.
    """
    with translate_queue_errors("backing off"):
        connection.set(keys.flush_backoff(prefix), why[:200], px=POSTGRES_BACKOFF_MS)


def backing_off(connection: redis.Redis, prefix: str) -> bool:
    with translate_queue_errors("reading the flush backoff"):
        return bool(connection.exists(keys.flush_backoff(prefix)))
