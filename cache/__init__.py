"""The Redis hot store: records, keys, codec, scripts and ``RedisSessionCache``."""

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
    OwnerType,
    RunRef,
    Scope,
    SessionKey,
    SessionStatus,
    SessionWrite,
    Snapshot,
    SnapshotLayer,
    StoredSession,
)
from cache.settings import Settings
from cache.store import EndedRun, Loaded, RedisSessionCache

__all__ = [
    "AgentSessionsError",
    "BacklogFull",
    "ClosedBy",
    "ConfigurationError",
    "ConversationScope",
    "CorruptValue",
    "DirtyEntry",
    "EndedRun",
    "InvalidId",
    "InvalidInput",
    "InvalidSnapshot",
    "KeySpace",
    "LayerSpec",
    "LifecycleState",
    "Loaded",
    "OwnerType",
    "PayloadTooLarge",
    "RedisClient",
    "RedisSessionCache",
    "Refused",
    "RunEnded",
    "RunRef",
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
