"""Building a Redis client from the settings, and translating its errors."""

from __future__ import annotations

import re
import threading
from typing import Any, Final, TypeAlias
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from cache.errors import StoreOutOfMemory, StoreUnavailable
from cache.settings import Settings

RedisClient: TypeAlias = redis.Redis | RedisCluster


class ServerEpoch:
    """Counts the Redis servers this process has met: a server it had not seen at an
    address (a restart, a failover to a replica) starts a new epoch.

    A Redis that went back in time (a promoted replica that missed writes, a restart that
    lost the AOF's last second) is always such a new server, so what this process checked
    against Postgres in an earlier epoch (an owner not ended) is checked again. Every
    connection reads the server's ``run_id`` once, when it connects.
    """

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()
        self.value = 0

    def observe(self, connection: Any) -> None:
        """The connect hook: authenticate as usual, then note which server answered."""
        connection.on_connect()
        try:
            connection.send_command("INFO", "server")
            info = connection.read_response()
        except redis.ResponseError:  # INFO refused (an ACL): servers cannot be told apart
            info = b""
        run_id = _RUN_ID.search(info if isinstance(info, bytes) else str(info).encode())
        host = getattr(connection, "host", None)
        address = f"{host}:{connection.port}" if host else str(getattr(connection, "path", ""))
        with self._lock:
            known = run_id.group(1).decode() if run_id else ""
            if self._seen.get(address) != known:
                self._seen[address] = known
                self.value += 1


SERVER_EPOCH: Final = ServerEpoch()
"""This process's :class:`ServerEpoch` (every client :func:`connect` makes reports to it)."""
_RUN_ID = re.compile(rb"\brun_id:([0-9a-f]+)")


def connect(settings: Settings) -> RedisClient:
    """A client for ``settings.redis_url``; bytes replies, since snapshots are binary.

    No command is retried by the client: a write whose reply was lost may have been
    applied, so sending it again could apply it twice (a save would then find its own
    version and report a conflict). A lost reply is :class:`StoreUnavailable` and the
    caller decides. Every new connection reports its server to :data:`SERVER_EPOCH`.
    """
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, **client_options(settings))
    return redis.Redis.from_url(
        settings.redis_url, health_check_interval=30, **client_options(settings)
    )


def client_options(settings: Settings) -> dict[str, Any]:
    """What every client :func:`connect` makes is built with (standalone or cluster)."""
    return {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "redis_connect_func": SERVER_EPOCH.observe,
    }


class translate_errors:
    """Re-raise redis-py's errors as :class:`StoreUnavailable`, from the original.

    A class, not a ``@contextmanager`` generator: the hot path enters it twice per loop
    iteration, and a generator costs three times as much to make, enter and leave."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None or not isinstance(exc, redis.RedisError):
            return
        what = self.what
        if isinstance(exc, redis.exceptions.OutOfMemoryError):
            raise StoreOutOfMemory(f"{what}: Redis is over maxmemory: {exc}") from exc
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            unknown = "connecting to" not in str(exc)  # else it failed before anything was sent
            message = f"{what}: Redis is unavailable: {exc}"
            raise StoreUnavailable(message, outcome_unknown=unknown) from exc
        raise StoreUnavailable(f"{what}: Redis refused the command: {exc}") from exc


def safe_url(url: str) -> str:
    """``url`` as it may be logged: a password in its user part or its query masked."""
    userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if at and colon and password:
        url = url.replace(f"{userinfo}@", f"{user}:***@", 1)
    return _QUERY_PASSWORD.sub(r"\1***", url)


_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*")
