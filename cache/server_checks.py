"""What a store checks of the Redis it is given, once, when it is built: the shard count its
keys were laid out with, the eviction policy, and whether session hashes stay listpacks."""

from __future__ import annotations

import logging
from typing import Final, cast

import redis
from redis.cluster import RedisCluster

from cache.client import RedisClient, safe_url, translate_errors
from cache.errors import ConfigurationError, StoreUnavailable
from cache.keys import KeySpace

_POLICY = "maxmemory-policy"
_LISTPACK_VALUE = "hash-max-listpack-value"
LISTPACK_ADVICE: Final = 16384
"""The ``hash-max-listpack-value`` the README recommends: an ~8 KB snapshot's hash stays a
listpack."""

log = logging.getLogger(__name__)


def check_layout(client: RedisClient, keys: KeySpace, *, record: bool = True) -> None:
    """Record the shard count on first use; refuse to run against a different one.

    Read first: a process that only drains must start even when Redis is over maxmemory.
    With ``record=False`` (a read-only command) an unrecorded count is left unrecorded.
    """
    with translate_errors("checking the key layout"):
        stored = cast(bytes | None, client.hget(keys.meta, "shards"))
        if stored is None and not record:
            return
        if stored is None:
            client.hsetnx(keys.meta, "shards", keys.shards)
            stored = cast(bytes | None, client.hget(keys.meta, "shards"))
    found = stored.decode(errors="replace") if stored else None
    if found != str(keys.shards):
        raise ConfigurationError(
            f"{keys.meta} says shards={found}, this process is configured with "
            f"shards={keys.shards}; keys would land in the wrong shards"
        )


def check_server_config(client: RedisClient, redis_url: str) -> None:
    """Refuse ``allkeys-*`` eviction, warn about ``volatile-*`` (README, Durability), and say
    when session hashes will take Redis' costlier encoding (README, Memory).

    ``allkeys-*`` may evict a dirty session, a dirty set or a run marker: acknowledged saves
    would vanish before reaching Postgres. ``volatile-*`` only evicts keys with a TTL (flushed
    sessions, which read-through brings back). A Redis that refuses CONFIG (managed services,
    ACLs) is trusted, and said so in the log.
    """
    for node, policy in server_config(client, redis_url, _POLICY, "noeviction").items():
        if policy.startswith("allkeys-"):
            raise ConfigurationError(
                f"Redis {node} runs maxmemory-policy {policy}, which evicts sessions that "
                "have not reached Postgres yet; set noeviction or a volatile-* policy"
            )
        if policy.startswith("volatile-"):
            log.warning(
                "Redis %s runs maxmemory-policy %s: flushed sessions may be evicted and read "
                "back from Postgres on their next entry; dirty ones never are",
                node,
                policy,
            )
    for node, value in server_config(client, redis_url, _LISTPACK_VALUE, "").items():
        if value.isdigit() and int(value) < LISTPACK_ADVICE:
            log.info(
                "Redis %s runs %s %s: a session hash holding a larger snapshot is a "
                "hashtable, whose overhead per session is about twice a listpack's; "
                "%s %d keeps an ~8 KB snapshot's hash a listpack (README, Memory)",
                node,
                _LISTPACK_VALUE,
                value,
                _LISTPACK_VALUE,
                LISTPACK_ADVICE,
            )


def server_config(client: RedisClient, redis_url: str, name: str, default: str) -> dict[str, str]:
    """``{node: value}`` of a CONFIG parameter on every primary; empty if CONFIG is refused."""
    try:
        with translate_errors(f"reading {name}"):
            if isinstance(client, RedisCluster):
                replies: dict[str, dict[str, str]] = client.config_get(  # type: ignore[assignment]
                    name, target_nodes=RedisCluster.PRIMARIES
                )
                return {node: str(reply.get(name, default)) for node, reply in replies.items()}
            reply = client.config_get(name)
    except StoreUnavailable as exc:
        if not isinstance(exc.__cause__, redis.ResponseError):
            raise
        log.info("cannot read %s (%s); not checked", name, exc.__cause__)
        return {}
    return {safe_url(redis_url): str(reply.get(name, default))}
