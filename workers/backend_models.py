"""Agent-backend HTTP protocol models (pydantic v2), mirroring dify-agent's DTOs.

Every model forbids unknown fields, like the real backend: a field added on one side must be
deployed to the consumer first. The converters at the bottom translate between these wire
models and the domain records of :mod:`cache.records`; a round trip is exact.

One deliberate extension: :class:`RunStatusResponse` also carries the run's outcome
(``session_snapshot``, ``output``, ``pause_reason``, ``deferred_tool_call``). The real backend
delivers those only in its terminal run event (SSE / events endpoint); carrying them in the
status lets a client that only polls ``GET /runs/{id}`` finish an Agent node. All four fields are
optional, so a status without them still validates.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from cache.errors import InvalidSnapshot
from cache.records import LayerSpec, Snapshot

PROTOCOL_SCHEMA_VERSION = 1

ExitIntent: TypeAlias = Literal["delete", "suspend"]
RunStatus: TypeAlias = Literal["running", "paused", "succeeded", "failed", "cancelled"]
SnapshotLifecycleState: TypeAlias = Literal["new", "suspended", "closed"]
RunPurpose: TypeAlias = Literal[
    "workflow_node", "single_step", "agent_app", "babysit", "fasten_preview"
]

TERMINAL_STATUSES: frozenset[RunStatus] = frozenset({"paused", "succeeded", "failed", "cancelled"})


def is_terminal(status: RunStatus) -> bool:
    """True for every status but ``running`` (a paused run has ended; resuming is a new run)."""
    return status in TERMINAL_STATUSES


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunLayerSpec(_Model):
    """One layer of a composition: provider type, dependencies and per-run config."""

    name: str
    type: str
    deps: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    config: JsonValue = None


class RunComposition(_Model):
    """The layer graph of one run, in compositor order."""

    schema_version: int = PROTOCOL_SCHEMA_VERSION
    layers: list[RunLayerSpec]

    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)


class LayerSessionSnapshot(_Model):
    """One layer's lifecycle and runtime state between runs (``active`` never leaves a run)."""

    name: str
    lifecycle_state: SnapshotLifecycleState
    runtime_state: dict[str, JsonValue]


class CompositorSessionSnapshot(_Model):
    """Every layer's state between runs; layer names must equal the composition's, in order."""

    schema_version: int = PROTOCOL_SCHEMA_VERSION
    layers: list[LayerSessionSnapshot]

    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)


class LayerExitSignals(_Model):
    """What each layer does when the run exits: keep its state (suspend) or drop it (delete)."""

    default: ExitIntent = "suspend"
    layers: dict[str, ExitIntent] = Field(default_factory=dict)

    def intent_for(self, layer_name: str) -> ExitIntent:
        return self.layers.get(layer_name, self.default)


class CreateRunRequest(_Model):
    """Body of ``POST /runs``."""

    composition: RunComposition
    purpose: RunPurpose = "workflow_node"
    idempotency_key: str | None = None
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    session_snapshot: CompositorSessionSnapshot | None = None
    on_exit: LayerExitSignals = Field(default_factory=LayerExitSignals)


class CreateRunResponse(_Model):
    """Answer of ``POST /runs``: the run was accepted (validation happens later, in the run)."""

    run_id: str
    status: RunStatus


class RunStatusResponse(_Model):
    """Answer of ``GET /runs/{id}``, extended with the outcome (see the module docstring)."""

    run_id: str
    status: RunStatus
    created_at: datetime
    updated_at: datetime
    error: str | None = None
    session_snapshot: CompositorSessionSnapshot | None = None
    output: JsonValue = None
    pause_reason: str | None = None
    deferred_tool_call: dict[str, JsonValue] | None = None

    @property
    def terminal(self) -> bool:
        return is_terminal(self.status)


class CancelRunRequest(_Model):
    """Body of ``POST /runs/{id}/cancel``."""

    reason: str | None = None
    message: str | None = None


class CancelRunResponse(_Model):
    """Answer of ``POST /runs/{id}/cancel``: the cancellation intent was recorded."""

    run_id: str
    status: RunStatus


# ----------------------------------------------------------------------------- converters


def snapshot_to_protocol(snapshot: Snapshot) -> CompositorSessionSnapshot:
    """The wire form of a stored snapshot; :class:`InvalidSnapshot` if a state is not JSON."""
    try:
        return CompositorSessionSnapshot.model_validate(snapshot.to_dict())
    except ValidationError as exc:
        raise InvalidSnapshot(f"snapshot is not valid protocol JSON: {exc}") from exc


def snapshot_from_protocol(snapshot: CompositorSessionSnapshot) -> Snapshot:
    """The domain record of a wire snapshot (:class:`InvalidSnapshot` on duplicate names)."""
    return Snapshot.from_dict(snapshot.model_dump(mode="python"))


def spec_to_protocol(spec: LayerSpec) -> RunLayerSpec:
    """The wire form of a stored layer spec; :class:`InvalidSnapshot` if config is not JSON."""
    try:
        return RunLayerSpec.model_validate(spec.to_dict())
    except ValidationError as exc:
        raise InvalidSnapshot(f"layer spec {spec.name!r} is not valid protocol JSON") from exc


def spec_from_protocol(spec: RunLayerSpec) -> LayerSpec:
    """The domain record of a wire layer spec."""
    return LayerSpec.from_dict(spec.model_dump(mode="python"))


def composition_from_specs(specs: Sequence[LayerSpec]) -> RunComposition:
    """A composition that replays stored specs in order (what a cleanup run sends)."""
    return RunComposition(layers=[spec_to_protocol(spec) for spec in specs])
