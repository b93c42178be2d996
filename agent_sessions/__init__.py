"""The public face: ``Settings``, ``SessionLifecycle`` and its records, the CLI and the demo."""

from __future__ import annotations

from agent_sessions.lifecycle import (
    EndReport,
    Entry,
    NodeResult,
    PauseRequest,
    RunOutcome,
    SessionLifecycle,
)
from cache.errors import AgentSessionsError
from cache.records import LayerSpec, Scope, SessionKey, Snapshot, SnapshotLayer
from cache.settings import Settings

__all__ = [
    "AgentSessionsError",
    "EndReport",
    "Entry",
    "LayerSpec",
    "NodeResult",
    "PauseRequest",
    "RunOutcome",
    "Scope",
    "SessionKey",
    "SessionLifecycle",
    "Settings",
    "Snapshot",
    "SnapshotLayer",
]
