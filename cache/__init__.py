"""The Redis hot store, the lowest layer above ``lua``; one module per job:

* ``records``: scopes, keys, sessions and owners; ``validate``: checks at the door;
  ``codec``: msgpack of snapshots and specs; ``errors``: the exception tree's root.
* ``keys``: every Redis key name (sessions, owners, shards' sets and locks, queue markers).
* ``scripts``: loads ``lua/`` (prelude included) and maps return codes to results.
* ``store``: ``RedisSessionCache`` (loads, saves, retires, owners' ends, cleanups);
  ``flush_side``: its flush calls; ``replies``: what its calls answer;
  ``server_checks``: the shard layout and eviction-policy checks it runs at start.
* ``client``: connecting (standalone or cluster) and the server epoch; ``wire``: the pinned
  connection of the hot path; ``settings``; ``metrics``; ``clock``.
"""

from __future__ import annotations

from cache.client import RedisClient, connect
from cache.errors import (
    AgentSessionsError,
    BacklogFull,
    ConfigurationError,
    CorruptValue,
    InvalidId,
    InvalidInput,
    InvalidSnapshot,
    PayloadTooLarge,
    Refused,
    RunEnded,
    ScriptContractError,
    StoreUnavailable,
    VersionConflict,
)
from cache.flush_side import DirtyEntry
from cache.keys import KeySpace
from cache.records import (
    ClosedBy,
    ConversationScope,
    LayerSpec,
    LifecycleState,
    Owner,
    OwnerType,
    Scope,
    SessionKey,
    SessionStatus,
    SessionWrite,
    Snapshot,
    SnapshotLayer,
    StoredSession,
)
from cache.replies import EndedOwner, Loaded
from cache.settings import Settings
from cache.store import RedisSessionCache

__all__ = [
    "AgentSessionsError",
    "BacklogFull",
    "ClosedBy",
    "ConfigurationError",
    "ConversationScope",
    "CorruptValue",
    "DirtyEntry",
    "EndedOwner",
    "InvalidId",
    "InvalidInput",
    "InvalidSnapshot",
    "KeySpace",
    "LayerSpec",
    "LifecycleState",
    "Loaded",
    "Owner",
    "OwnerType",
    "PayloadTooLarge",
    "RedisClient",
    "RedisSessionCache",
    "Refused",
    "RunEnded",
    "Scope",
    "ScriptContractError",
    "SessionKey",
    "SessionStatus",
    "SessionWrite",
    "Settings",
    "Snapshot",
    "SnapshotLayer",
    "StoreUnavailable",
    "StoredSession",
    "VersionConflict",
    "connect",
]
