"""Building a Redis client from the settings, and translating its errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeAlias
from urllib.parse import urlsplit

import redis
from redis.cluster import RedisCluster

from cache.errors import StoreOutOfMemory, StoreUnavailable
from cache.settings import Settings

RedisClient: TypeAlias = redis.Redis | RedisCluster


def connect(settings: Settings) -> RedisClient:
    """A client for ``settings.redis_url``; bytes replies, since snapshots are binary."""
    if settings.redis_cluster:
        return RedisCluster.from_url(
            settings.redis_url,
            socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.socket_timeout_s,
        )
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,
    )


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Re-raise redis-py's errors as :class:`StoreUnavailable`, from the original."""
    try:
        yield
    except redis.exceptions.OutOfMemoryError as exc:
        raise StoreOutOfMemory(f"{what}: Redis is over maxmemory: {exc}") from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"{what}: Redis is unavailable: {exc}") from exc
    except redis.RedisError as exc:
        raise StoreUnavailable(f"{what}: Redis refused the command: {exc}") from exc


def safe_url(url: str) -> str:
    """``url`` as it may be logged: a password in its user part or its query masked."""
    userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if at and colon and password:
        url = url.replace(f"{userinfo}@", f"{user}:***@", 1)
    return _QUERY_PASSWORD.sub(r"\1***", url)


_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*")
