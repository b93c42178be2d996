"""Agent-backend HTTP protocol types (msgspec), mirroring dify-agent's DTOs.

The snapshot and layer types ARE the stored records of :mod:`cache.records`: the wire's
``CompositorSessionSnapshot`` is ``Snapshot``, ``LayerSessionSnapshot`` is ``SnapshotLayer`` and
``RunLayerSpec`` is ``LayerSpec`` (the names below are aliases of the same types), so a snapshot
goes from the backend's JSON to Redis to Postgres and back without a second model or a
converter. Every type forbids unknown fields, like the real backend: a field added on one side
must be deployed to the consumer first. :func:`decode_json` / :func:`encode_json` are the one
place JSON meets these types.

One deliberate extension: :class:`RunStatusResponse` also carries the run's outcome
(``session_snapshot``, ``output``, ``pause_reason``, ``deferred_tool_call``). The real backend
delivers those only in its terminal run event (SSE / events endpoint); carrying them in the
status lets a client that only polls ``GET /runs/{id}`` finish an Agent node. All four fields are
optional, so a status without them still decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final, Literal, TypeAlias, TypeVar

import msgspec

from cache.records import LayerSpec, OwnerType, Snapshot, SnapshotLayer
from cache.snapshot_json import RawSnapshot

PROTOCOL_SCHEMA_VERSION = 1

ExitIntent: TypeAlias = Literal["delete", "suspend"]
RunStatus: TypeAlias = Literal["running", "paused", "succeeded", "failed", "cancelled"]
SnapshotLifecycleState: TypeAlias = Literal["new", "suspended", "closed"]
RunPurpose: TypeAlias = Literal[
    "workflow_node", "single_step", "agent_app", "babysit", "fasten_preview"
]
JsonValue: TypeAlias = Any
PURPOSES: dict[OwnerType, RunPurpose] = {
    OwnerType.WORKFLOW_RUN: "workflow_node",
    OwnerType.CONVERSATION: "agent_app",
}
"""The ``purpose`` of a session owner's backend runs (its turns and its cleanup)."""

TERMINAL_STATUSES: frozenset[RunStatus] = frozenset({"paused", "succeeded", "failed", "cancelled"})

RunLayerSpec: TypeAlias = LayerSpec
"""One layer of a composition: provider type, dependencies and per-run config."""
CompositorSessionSnapshot: TypeAlias = Snapshot
"""Every layer's state between runs; layer names must equal the composition's, in order."""
LayerSessionSnapshot: TypeAlias = SnapshotLayer
"""One layer's lifecycle and runtime state between runs (``active`` never leaves a run)."""


def is_terminal(status: RunStatus) -> bool:
    """True for every status but ``running`` (a paused run has ended; resuming is a new run)."""
    return status in TERMINAL_STATUSES


class _Wire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A protocol type: unknown fields refused, like the real backend."""


class RunComposition(_Wire, frozen=True):
    """The layer graph of one run, in compositor order."""

    layers: list[LayerSpec]
    schema_version: int = PROTOCOL_SCHEMA_VERSION

    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)


class LayerExitSignals(_Wire, frozen=True):
    """What each layer does when the run exits: keep its state (suspend) or drop it (delete)."""

    default: ExitIntent = "suspend"
    layers: dict[str, ExitIntent] = msgspec.field(default_factory=dict)

    def intent_for(self, layer_name: str) -> ExitIntent:
        return self.layers.get(layer_name, self.default)


class CreateRunRequest(_Wire, frozen=True):
    """Body of ``POST /runs``."""

    composition: RunComposition
    purpose: RunPurpose = "workflow_node"
    idempotency_key: str | None = None
    metadata: dict[str, JsonValue] = msgspec.field(default_factory=dict)
    session_snapshot: Snapshot | None = None
    on_exit: LayerExitSignals = msgspec.field(default_factory=LayerExitSignals)


class CreateRunResponse(_Wire, frozen=True):
    """Answer of ``POST /runs``: the run was accepted (validation happens later, in the run)."""

    run_id: str
    status: RunStatus


class RunStatusResponse(_Wire, frozen=True):
    """Answer of ``GET /runs/{id}``, extended with the outcome (see the module docstring)."""

    run_id: str
    status: RunStatus
    created_at: datetime
    updated_at: datetime
    error: str | None = None
    session_snapshot: Snapshot | None = None
    output: JsonValue = None
    pause_reason: str | None = None
    deferred_tool_call: dict[str, JsonValue] | None = None

    @property
    def terminal(self) -> bool:
        return is_terminal(self.status)


class WireRunStatus(RunStatusResponse, frozen=True):
    """A status :func:`decode_status` decoded from the backend's JSON. Its snapshot keeps
    each layer's state as that JSON's text (:class:`~cache.snapshot_json.RawSnapshot`), so
    the state is never decoded into Python values on its way to Redis: saving it checks the
    text (``snapshot.decoded()`` gives the values). Statuses built in Python are
    :class:`RunStatusResponse`."""

    session_snapshot: RawSnapshot | None = None


class CancelRunRequest(_Wire, frozen=True):
    """Body of ``POST /runs/{id}/cancel``."""

    reason: str | None = None
    message: str | None = None


class CancelRunResponse(_Wire, frozen=True):
    """Answer of ``POST /runs/{id}/cancel``: the cancellation intent was recorded."""

    run_id: str
    status: RunStatus


_M = TypeVar("_M", bound=msgspec.Struct)
_DECODERS: Final[dict[type[Any], msgspec.json.Decoder[Any]]] = {}
_ENCODER: Final = msgspec.json.Encoder()


def decode_json(kind: type[_M], data: bytes | str) -> _M:
    """``data`` as ``kind``; ``msgspec.DecodeError`` (``ValidationError``) if it is not one."""
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind)
    return decoder.decode(data)  # type: ignore[no-any-return]


def encode_json(value: object) -> bytes:
    return _ENCODER.encode(value)


def decode_status(data: bytes) -> WireRunStatus:
    """A ``GET /runs/{id}`` answer, marked as decoded from JSON (see :class:`WireRunStatus`)."""
    return decode_json(WireRunStatus, data)


def composition_from_specs(specs: Sequence[LayerSpec]) -> RunComposition:
    """A composition that replays stored specs in order (what a cleanup run sends)."""
    return RunComposition(layers=list(specs))
