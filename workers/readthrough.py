"""Read-through: a Redis miss loads the row from Postgres and fills Redis with it.

It sits above the cache so the layering holds (cache never imports persistence). The fill
carries the row's version, so a session's version never restarts after Redis lost a key.
"""

from __future__ import annotations

from cache.metrics import LOADS
from cache.records import SessionKey
from cache.store import Loaded, RedisSessionCache
from persistence.repository import SessionRepository


def load_through(cache: RedisSessionCache, repo: SessionRepository, key: SessionKey) -> Loaded:
    """The session of ``key`` from Redis, or from Postgres (then cached) on a miss."""
    loaded = cache.load(key)
    if loaded.record is not None:
        return loaded
    row = repo.get(key)
    if row is None:
        return loaded
    LOADS.labels("postgres").inc()
    if cache.fill(row):
        return Loaded(row)
    return cache.load(key)
