"""RQ queues, job ids and enqueueing. JSON serializer only: no pickle anywhere.

A flush job's id names its shard (``asc-flush-s042``) and is enqueued with ``unique=True``, so
however many triggers fire, a shard has at most one flush job queued, scheduled for retry or
running. Urgent flushes (a pause, a retire, a run's end) use a second id per shard so they
never wait behind a delayed one; the shard's flush lock still serializes the two.
"""

from __future__ import annotations

import redis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from cache.settings import Settings

FLUSH_RETRY = Retry(max=8, interval=[1, 2, 4, 8, 15, 30])
FLUSH_JOB_TIMEOUT_S = 120
FAILED_FLUSH_TTL_S = 30


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


def flush_job_id(prefix: str, shard: int, *, urgent: bool) -> str:
    return f"{prefix}-flush-s{shard:03d}" + ("-urgent" if urgent else "")


def enqueue_flush(queue: Queue, prefix: str, shard: int, *, urgent: bool = False) -> bool:
    """Queue a flush of ``shard``; ``False`` if a job that has not started yet will do it.

    A job that already runs may have read its batch before the caller's save, so an urgent
    request then queues one follow-up (``...-urgent-next``) instead of being dropped.
    """
    base = flush_job_id(prefix, shard, urgent=urgent)
    for job_id in (base, f"{base}-next") if urgent else (base,):
        try:
            _enqueue_flush_job(queue, job_id, shard, urgent)
        except DuplicateJobError:
            existing = queue.fetch_job(job_id)
            if existing is None or existing.get_status() != JobStatus.STARTED:
                return False
            continue
        return True
    return False


def _enqueue_flush_job(queue: Queue, job_id: str, shard: int, urgent: bool) -> None:
    queue.enqueue(
        "workers.jobs.flush_job",
        shard,
        urgent,
        job_id=job_id,
        unique=True,
        at_front=urgent,
        retry=FLUSH_RETRY,
        job_timeout=FLUSH_JOB_TIMEOUT_S,
        result_ttl=0,
        failure_ttl=FAILED_FLUSH_TTL_S,
    )
