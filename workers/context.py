"""What a worker process needs, built once per process from the environment.

RQ calls job functions with JSON arguments only, so a job cannot be handed its Redis
client or its Postgres engine; it asks :func:`current` for the process's context instead.
Everything else receives a :class:`WorkerContext` explicitly.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import redis
from rq import Queue

from agent_backend.client import AgentBackendClient, response_cap
from cache.client import connect
from cache.settings import Settings
from cache.store import RedisSessionCache
from persistence.engine import create_engine
from persistence.repository import SessionRepository
from workers.flush_policy import pending_ttl_ms
from workers.queues import FlushRequest, cleanup_queue, flush_queue, queue_connection, request_flush

STOP_REQUESTED = threading.Event()
"""Set in a worker process asked to stop (``SessionWorker``): a job that would wait long
(a cleanup waiting on the backend) gives its work back instead of holding the stop up."""


@dataclass(frozen=True)
class WorkerContext:
    """The store, the repository, the queues and the backend client of one process."""

    settings: Settings
    cache: RedisSessionCache
    repo: SessionRepository
    queue_redis: redis.Redis
    flush_queue: Queue
    cleanup_queue: Queue
    backend: AgentBackendClient | None

    @classmethod
    def from_settings(cls, settings: Settings, *, read_only: bool = False) -> WorkerContext:
        """Connect everything; ``read_only`` builds a store that records nothing on start
        (for the CLI's commands that only look)."""
        queue_redis = queue_connection(settings)
        return cls(
            settings=settings,
            cache=RedisSessionCache(connect(settings), settings, read_only=read_only),
            repo=SessionRepository(create_engine(settings.database_url), settings.key_prefix),
            queue_redis=queue_redis,
            flush_queue=flush_queue(queue_redis, settings.key_prefix),
            cleanup_queue=cleanup_queue(queue_redis, settings.key_prefix),
            backend=_backend(settings),
        )

    def request_flush(self, shard: int, *, urgent: bool = True) -> FlushRequest:
        """Make sure a flush job of ``shard`` that has not started waits in the queue; an
        urgent one (the default: a pause, a retire, an owner's end, an operator) goes to the
        front and takes every dirty entry (``workers.flush_policy``). Raises
        :class:`~workers.queues.QueueUnavailable`; nothing is left behind then."""
        return request_flush(
            self.flush_queue,
            self.settings.key_prefix,
            shard,
            urgent=urgent,
            pending_ms=pending_ttl_ms(self.settings),
        )

    def close(self) -> None:
        """Release the Redis connections and the Postgres pool."""
        self.repo.close()
        self.cache.close()
        self.queue_redis.close()
        if self.backend is not None:
            self.backend.close()


def _backend(settings: Settings) -> AgentBackendClient | None:
    """The backend client, its answers capped by what a stored snapshot may weigh."""
    if not settings.agent_backend_url:
        return None
    return AgentBackendClient(
        settings.agent_backend_url,
        timeout_s=settings.backend_timeout_s,
        max_response_bytes=response_cap(settings.max_snapshot_bytes),
    )


@functools.cache
def current() -> WorkerContext:
    """This process's context, from the environment (built on first use)."""
    return WorkerContext.from_settings(Settings())
