"""The public face: ``Settings``, ``SessionLifecycle`` and its records (``outcomes``), and the
agent-backend protocol a node speaks (client, request and status types), so callers never
import ``workers`` or ``agent_backend`` modules. ``lifecycle`` is the node contract,
``requests`` builds a node's backend request, ``ends`` asks Postgres whether an owner ended;
``audit``, ``health`` and ``inspection`` serve the CLI (``cli``, ``cli_common``, ``cli_ops``,
``cli_poison``, ``cli_migrate``).
The demo and the fake backend live in ``agent_sessions.demo`` and ``agent_sessions.testing``."""

from __future__ import annotations

from agent_backend.client import AgentBackendClient
from agent_backend.models import (
    CreateRunRequest,
    CreateRunResponse,
    RunComposition,
    RunLayerSpec,
    RunStatusResponse,
    WireRunStatus,
)
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.outcomes import EndReport, Entry, NodeResult, PauseRequest, RunOutcome
from cache.errors import AgentSessionsError
from cache.records import (
    ConversationScope,
    LayerSpec,
    OwnerType,
    Scope,
    SessionKey,
    Snapshot,
    SnapshotLayer,
)
from cache.settings import Settings

__all__ = [
    "AgentBackendClient",
    "AgentSessionsError",
    "ConversationScope",
    "CreateRunRequest",
    "CreateRunResponse",
    "EndReport",
    "Entry",
    "LayerSpec",
    "NodeResult",
    "OwnerType",
    "PauseRequest",
    "RunComposition",
    "RunLayerSpec",
    "RunOutcome",
    "RunStatusResponse",
    "Scope",
    "SessionKey",
    "SessionLifecycle",
    "Settings",
    "Snapshot",
    "SnapshotLayer",
    "WireRunStatus",
]
