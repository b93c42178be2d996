"""Domain records: scope, session key, snapshot, layer specs and stored sessions.

Plain frozen dataclasses rather than pydantic models: they sit on the hot path (every loop
iteration decodes one snapshot), and their validation is small enough to write once here.
Every constructor validates, so a record that exists is a record that may be written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias, TypeVar

from cache.errors import InvalidSnapshot
from cache.validate import check_id, check_json, check_json_object, check_name, check_optional_id

T = TypeVar("T")

JsonValue: TypeAlias = Any
"""A JSON value (None, bool, int, float, str, list, dict with str keys)."""

WORKFLOW_OUTCOMES = frozenset({"succeeded", "partial_succeeded", "failed", "aborted"})
"""How a workflow run can end. A pause is not an end."""
SNAPSHOT_SCHEMA_VERSION = 1


class SessionStatus(StrEnum):
    """Where a session is in its life (DESIGN §1)."""

    ACTIVE = "active"
    CLEANING = "cleaning"
    CLEANED = "cleaned"


class LifecycleState(StrEnum):
    """Lifecycle of one layer between backend runs (``active`` never leaves a run)."""

    NEW = "new"
    SUSPENDED = "suspended"
    CLOSED = "closed"


class ClosedBy(StrEnum):
    """Why a session stopped being resumable (for operators; ``run_ended`` decides TTLs)."""

    BACKEND_FAILURE = "backend_failure"
    WORKFLOW_END = "workflow_end"


@dataclass(frozen=True, slots=True)
class SessionKey:
    """The five IDs that identify one session; every loop iteration of a node shares it."""

    tenant_id: str
    workflow_run_id: str
    node_id: str
    binding_id: str
    agent_id: str

    def __post_init__(self) -> None:
        for name in ("tenant_id", "workflow_run_id", "node_id", "binding_id", "agent_id"):
            check_id(name, getattr(self, name))

    def parts(self) -> tuple[str, str, str, str, str]:
        return (self.tenant_id, self.workflow_run_id, self.node_id, self.binding_id, self.agent_id)


@dataclass(frozen=True, slots=True)
class RunRef:
    """One workflow run of one tenant."""

    tenant_id: str
    workflow_run_id: str

    def __post_init__(self) -> None:
        check_id("tenant_id", self.tenant_id)
        check_id("workflow_run_id", self.workflow_run_id)


@dataclass(frozen=True, slots=True)
class Scope:
    """Who a session belongs to: the five key IDs plus the attributes saved with it.

    ``workflow_run_id`` may be ``None`` (a single-step debug run); such a scope has no
    session and every store operation on it is a no-op.
    """

    tenant_id: str
    app_id: str
    workflow_id: str
    workflow_run_id: str | None
    node_id: str
    node_execution_id: str
    binding_id: str
    agent_id: str
    agent_config_snapshot_id: str

    def __post_init__(self) -> None:
        for name in ("tenant_id", "app_id", "workflow_id", "node_id", "node_execution_id"):
            check_id(name, getattr(self, name))
        for name in ("binding_id", "agent_id", "agent_config_snapshot_id"):
            check_id(name, getattr(self, name))
        check_optional_id("workflow_run_id", self.workflow_run_id)

    @property
    def key(self) -> SessionKey | None:
        if self.workflow_run_id is None:
            return None
        return SessionKey(
            self.tenant_id, self.workflow_run_id, self.node_id, self.binding_id, self.agent_id
        )


def _shallow_object(where: str, value: object) -> dict[str, JsonValue]:
    if not isinstance(value, dict):
        raise InvalidSnapshot(f"{where} must be an object")
    return value


def unchecked(cls: type[T], **fields: object) -> T:
    """An instance without ``__post_init__``: for data this library validated when writing."""
    obj = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    return obj


@dataclass(frozen=True, slots=True)
class SnapshotLayer:
    """The state of one compositor layer between backend runs."""

    name: str
    lifecycle_state: LifecycleState
    runtime_state: dict[str, JsonValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("snapshot layer name", self.name)
        try:
            object.__setattr__(self, "lifecycle_state", LifecycleState(self.lifecycle_state))
        except ValueError:
            raise InvalidSnapshot(
                f"layer {self.name!r}: lifecycle_state must be one of "
                f"{[s.value for s in LifecycleState]}, got {self.lifecycle_state!r}"
            ) from None
        check_json_object(f"layer {self.name!r} runtime_state", self.runtime_state)

    def to_dict(self) -> dict[str, JsonValue]:
        return {
            "name": self.name,
            "lifecycle_state": self.lifecycle_state.value,
            "runtime_state": self.runtime_state,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The agent's layer states between backend runs, in compositor order."""

    layers: tuple[SnapshotLayer, ...]
    schema_version: int = SNAPSHOT_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if type(self.schema_version) is not int or self.schema_version < 1:
            raise InvalidSnapshot(f"schema_version must be a positive int: {self.schema_version!r}")
        if not isinstance(self.layers, tuple | list):
            raise InvalidSnapshot("snapshot layers must be a sequence of SnapshotLayer records")
        object.__setattr__(self, "layers", tuple(self.layers))
        if not all(isinstance(layer, SnapshotLayer) for layer in self.layers):
            raise InvalidSnapshot("snapshot layers must be SnapshotLayer records")
        names = self.layer_names()
        if len(set(names)) != len(names):
            raise InvalidSnapshot(f"snapshot layer names must be unique: {list(names)}")

    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def aligned_to(self, names: Sequence[str]) -> Snapshot:
        """Exactly the layers ``names``, in that order; a layer the snapshot lacks starts ``new``.

        The backend refuses a snapshot whose layer names differ from the composition's, in
        order. Aligning keeps every layer's state that can be kept instead of failing the run.
        """
        if self.layer_names() == tuple(names):
            return self
        by_name = {layer.name: layer for layer in self.layers}
        return Snapshot(
            layers=tuple(by_name.get(n) or SnapshotLayer(n, LifecycleState.NEW) for n in names),
            schema_version=self.schema_version,
        )

    def to_dict(self) -> dict[str, JsonValue]:
        return {
            "schema_version": self.schema_version,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: object) -> Snapshot:
        raw = _shallow_object("snapshot", data)
        unknown = set(raw) - {"schema_version", "layers"}
        if unknown:
            raise InvalidSnapshot(f"unknown snapshot fields: {sorted(unknown)}")
        layers = raw.get("layers", [])
        if not isinstance(layers, list):
            raise InvalidSnapshot("snapshot layers must be a list")
        return cls(
            layers=tuple(_layer_from_dict(item) for item in layers),
            schema_version=raw.get("schema_version", SNAPSHOT_SCHEMA_VERSION),
        )


def snapshot_from_stored(data: object) -> Snapshot:
    """A snapshot this library stored: its structure is checked, its JSON values are not.

    Every value was checked deeply before it was written (and msgpack's strict map keys
    refuse non-string keys), so the hot path need not walk the whole tree again.
    """
    raw = _shallow_object("snapshot", data)
    layers = raw.get("layers")
    version = raw.get("schema_version")
    if not isinstance(layers, list) or type(version) is not int:
        raise InvalidSnapshot("snapshot needs an int schema_version and a list of layers")
    return unchecked(
        Snapshot, layers=tuple(_stored_layer(x) for x in layers), schema_version=version
    )


def _stored_layer(data: object) -> SnapshotLayer:
    raw = _shallow_object("snapshot layer", data)
    name, state = raw.get("name"), raw.get("runtime_state")
    if not isinstance(name, str) or not name or not isinstance(state, dict):
        raise InvalidSnapshot("snapshot layer needs a name and an object runtime_state")
    try:
        lifecycle = LifecycleState(str(raw.get("lifecycle_state")))
    except ValueError:
        raise InvalidSnapshot(f"layer {name!r}: unknown lifecycle_state") from None
    return unchecked(SnapshotLayer, name=name, lifecycle_state=lifecycle, runtime_state=state)


def specs_from_stored(data: object) -> tuple[LayerSpec, ...]:
    """Layer specs this library stored (structure checked, JSON values trusted)."""
    if not isinstance(data, list):
        raise InvalidSnapshot("layer specs must be a list")
    return tuple(_stored_spec(item) for item in data)


def _stored_spec(data: object) -> LayerSpec:
    raw = _shallow_object("layer spec", data)
    name, kind = raw.get("name"), raw.get("type")
    deps, metadata = raw.get("deps"), raw.get("metadata")
    if not isinstance(name, str) or not isinstance(kind, str) or not name or not kind:
        raise InvalidSnapshot("layer spec needs a name and a type")
    if not isinstance(deps, dict) or not isinstance(metadata, dict):
        raise InvalidSnapshot(f"layer spec {name!r} needs object deps and metadata")
    return unchecked(
        LayerSpec, name=name, type=kind, deps=deps, metadata=metadata, config=raw.get("config")
    )


def _layer_from_dict(data: object) -> SnapshotLayer:
    raw = _shallow_object("snapshot layer", data)
    unknown = set(raw) - {"name", "lifecycle_state", "runtime_state"}
    if unknown:
        raise InvalidSnapshot(f"unknown snapshot layer fields: {sorted(unknown)}")
    return SnapshotLayer(
        name=raw.get("name", ""),
        lifecycle_state=raw.get("lifecycle_state", ""),
        runtime_state=raw.get("runtime_state", {}),
    )


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One replayable, credential-free layer of the composition that produced a snapshot."""

    name: str
    type: str
    deps: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, JsonValue] = field(default_factory=dict)
    config: JsonValue = None

    def __post_init__(self) -> None:
        """Specs are stored as ``jsonb``: no NUL anywhere in them (Postgres refuses it)."""
        check_name("layer spec name", self.name)
        check_name(f"layer spec {self.name!r} type", self.type)
        deps = check_json_object(f"layer spec {self.name!r} deps", self.deps, nul_ok=False)
        for name, target in deps.items():
            check_name(f"layer spec {self.name!r} deps[{name!r}]", target)
        check_json_object(f"layer spec {self.name!r} metadata", self.metadata, nul_ok=False)
        check_json(f"layer spec {self.name!r} config", self.config, nul_ok=False)

    def to_dict(self) -> dict[str, JsonValue]:
        return {
            "name": self.name,
            "type": self.type,
            "deps": self.deps,
            "metadata": self.metadata,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, data: object) -> LayerSpec:
        raw = _shallow_object("layer spec", data)
        unknown = set(raw) - {"name", "type", "deps", "metadata", "config"}
        if unknown:
            raise InvalidSnapshot(f"unknown layer spec fields: {sorted(unknown)}")
        return cls(
            name=raw.get("name", ""),
            type=raw.get("type", ""),
            deps=raw.get("deps", {}),
            metadata=raw.get("metadata", {}),
            config=raw.get("config"),
        )


def specs_from_list(data: object) -> tuple[LayerSpec, ...]:
    if not isinstance(data, list):
        raise InvalidSnapshot("layer specs must be a list")
    return tuple(LayerSpec.from_dict(item) for item in data)


def specs_to_list(specs: Sequence[LayerSpec]) -> list[dict[str, JsonValue]]:
    return [spec.to_dict() for spec in specs]


@dataclass(frozen=True, slots=True)
class SessionWrite:
    """Everything a save writes besides status and version (which the script owns)."""

    snapshot: Snapshot
    layer_specs: tuple[LayerSpec, ...]
    app_id: str
    workflow_id: str
    node_execution_id: str
    agent_config_snapshot_id: str
    backend_run_id: str | None = None
    pending_form_id: str | None = None
    pending_tool_call_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.snapshot, Snapshot):
            raise InvalidSnapshot("snapshot must be a Snapshot")
        object.__setattr__(self, "layer_specs", tuple(self.layer_specs))
        if not all(isinstance(spec, LayerSpec) for spec in self.layer_specs):
            raise InvalidSnapshot("layer_specs must be LayerSpec records")
        for name in ("app_id", "workflow_id", "node_execution_id", "agent_config_snapshot_id"):
            check_id(name, getattr(self, name))
        for name in ("backend_run_id", "pending_form_id", "pending_tool_call_id"):
            check_optional_id(name, getattr(self, name))

    @classmethod
    def for_scope(
        cls,
        scope: Scope,
        snapshot: Snapshot,
        layer_specs: Sequence[LayerSpec] = (),
        *,
        backend_run_id: str | None = None,
        pending_form_id: str | None = None,
        pending_tool_call_id: str | None = None,
    ) -> SessionWrite:
        return cls(
            snapshot=snapshot,
            layer_specs=tuple(layer_specs),
            app_id=scope.app_id,
            workflow_id=scope.workflow_id,
            node_execution_id=scope.node_execution_id,
            agent_config_snapshot_id=scope.agent_config_snapshot_id,
            backend_run_id=backend_run_id,
            pending_form_id=pending_form_id,
            pending_tool_call_id=pending_tool_call_id,
        )


@dataclass(frozen=True, slots=True)
class StoredSession:
    """One session as stored, whatever its status (Redis hash or Postgres row)."""

    key: SessionKey
    status: SessionStatus
    version: int
    data: SessionWrite
    flushed_version: int = 0
    created_at: str | None = None
    updated_at: str | None = None
    cleaned_at: str | None = None
    closed_by: ClosedBy | None = None
    cleanup_error: str | None = None
    lineage: str | None = None
    """Which history this session's versions belong to: set when the session is created
    (or filled from Postgres) and kept by every later save. Equal versions of two lineages
    are two different sessions; the flush fence never takes one for the other."""

    @property
    def snapshot(self) -> Snapshot:
        return self.data.snapshot

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        return self.data.layer_specs

    @property
    def dirty(self) -> bool:
        return self.version > self.flushed_version
