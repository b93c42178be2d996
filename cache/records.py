"""Domain records: scope, session key, snapshot, layer specs and stored sessions.

The snapshot and layer specs are msgspec Structs: one compiled schema from the backend's
wire (JSON) to Redis (msgpack) to Postgres, decoded and encoded in C, with no second model
and no converters (README, Design notes). Keys, scopes and writes are frozen dataclasses
whose constructors validate, so a key or write that exists may be written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias, TypeVar

import msgspec

from cache.errors import InvalidId, InvalidInput, InvalidSnapshot
from cache.validate import check_id, check_optional_id

T = TypeVar("T")

JsonValue: TypeAlias = Any
"""A JSON value (None, bool, int, float, str, list, dict with str keys)."""

WORKFLOW_OUTCOMES = frozenset({"succeeded", "partial_succeeded", "failed", "aborted"})
"""How a workflow run can end. A pause is not an end."""
CONVERSATION_OUTCOMES = frozenset({"ended"})
"""How a conversation can end: explicitly (idle expiry retires its sessions instead)."""
OWNER_OUTCOMES = WORKFLOW_OUTCOMES | CONVERSATION_OUTCOMES
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
    CONVERSATION_END = "conversation_end"
    CONFIG_CHANGE = "config_change"
    """A conversation's turn came with another agent configuration snapshot."""
    IDLE = "idle"
    """A conversation was idle longer than ``conversation_idle_s``."""


OWNER_ENDS = frozenset({ClosedBy.WORKFLOW_END, ClosedBy.CONVERSATION_END})
"""Closers that mean the owner ended: such a session is never ``active`` again."""


class OwnerType(StrEnum):
    """Who owns a session: one workflow run, or one conversation of an Agent App."""

    WORKFLOW_RUN = "workflow_run"
    CONVERSATION = "conversation"

    @property
    def end_closer(self) -> ClosedBy:
        """What closes its sessions when the owner ends."""
        if self is OwnerType.WORKFLOW_RUN:
            return ClosedBy.WORKFLOW_END
        return ClosedBy.CONVERSATION_END

    @property
    def outcomes(self) -> frozenset[str]:
        return WORKFLOW_OUTCOMES if self is OwnerType.WORKFLOW_RUN else CONVERSATION_OUTCOMES


_WORKFLOW = OwnerType.WORKFLOW_RUN
_CONVERSATION = OwnerType.CONVERSATION


def _owner_type(value: object) -> OwnerType:
    if isinstance(value, OwnerType):
        return value
    try:
        return OwnerType(str(value))
    except ValueError:
        raise InvalidId(f"owner_type must be one of {[t.value for t in OwnerType]}") from None


@dataclass(frozen=True, slots=True)
class SessionKey:
    """The five IDs that identify one session, and who owns it.

    * a workflow run's session: ``(tenant_id, workflow_run_id, node_id, binding_id,
      agent_id)``; every loop iteration of a node shares it (``config_id`` is ``""``);
    * a conversation's session: ``(tenant_id, conversation_id, binding_id, agent_id,
      agent_config_snapshot_id)`` (:meth:`conversation`; ``node_id`` is ``""``): the config
      snapshot is part of the identity, so a configuration change never resumes an
      incompatible backend snapshot.

    ``owner_id`` is the workflow run id or the conversation id.
    """

    tenant_id: str
    owner_id: str
    node_id: str
    binding_id: str
    agent_id: str
    owner_type: OwnerType = _WORKFLOW
    config_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "owner_type", _owner_type(self.owner_type))
        check_id("tenant_id", self.tenant_id)
        check_id("binding_id", self.binding_id)
        check_id("agent_id", self.agent_id)
        if self.owner_type is _WORKFLOW:
            check_id("workflow_run_id", self.owner_id)
            check_id("node_id", self.node_id)
            if self.config_id:
                raise InvalidId("a workflow run's session key has no config_id")
        else:
            check_id("conversation_id", self.owner_id)
            check_id("agent_config_snapshot_id", self.config_id)
            if self.node_id:
                raise InvalidId("a conversation's session key has no node_id")

    @classmethod
    def conversation(
        cls, tenant_id: str, conversation_id: str, binding_id: str, agent_id: str, config_id: str
    ) -> SessionKey:
        return cls(tenant_id, conversation_id, "", binding_id, agent_id, _CONVERSATION, config_id)

    @property
    def workflow_run_id(self) -> str | None:
        """The workflow run's id; ``None`` for a conversation's session."""
        return self.owner_id if self.owner_type is _WORKFLOW else None

    @property
    def conversation_id(self) -> str | None:
        return self.owner_id if self.owner_type is _CONVERSATION else None

    @property
    def owner(self) -> Owner:
        return Owner(self.tenant_id, self.owner_id, self.owner_type)

    def parts(self) -> tuple[str, str, str, str, str]:
        """The five IDs, in key-name order (the owner's three after tenant and owner id)."""
        if self.owner_type is _WORKFLOW:
            return (self.tenant_id, self.owner_id, self.node_id, self.binding_id, self.agent_id)
        return (self.tenant_id, self.owner_id, self.binding_id, self.agent_id, self.config_id)

    def sort_key(self) -> tuple[str, ...]:
        return (self.owner_type.value, *self.parts())

    @classmethod
    def of_parts(cls, owner_type: OwnerType | str, *parts: str) -> SessionKey:
        """The key of :meth:`parts` (and its owner type)."""
        tenant_id, owner_id, first, second, third = parts
        if _owner_type(owner_type) is _WORKFLOW:
            return cls(tenant_id, owner_id, first, second, third)
        return cls.conversation(tenant_id, owner_id, first, second, third)


@dataclass(frozen=True, slots=True)
class Owner:
    """One owner of sessions: a workflow run (the default) or a conversation, of one tenant."""

    tenant_id: str
    owner_id: str
    owner_type: OwnerType = _WORKFLOW

    def __post_init__(self) -> None:
        object.__setattr__(self, "owner_type", _owner_type(self.owner_type))
        check_id("tenant_id", self.tenant_id)
        name = "workflow_run_id" if self.owner_type is _WORKFLOW else "conversation_id"
        check_id(name, self.owner_id)

    @classmethod
    def conversation(cls, tenant_id: str, conversation_id: str) -> Owner:
        return cls(tenant_id, conversation_id, _CONVERSATION)


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
        return unchecked(  # the IDs were checked when this scope was made
            SessionKey,
            tenant_id=self.tenant_id,
            owner_id=self.workflow_run_id,
            node_id=self.node_id,
            binding_id=self.binding_id,
            agent_id=self.agent_id,
            owner_type=_WORKFLOW,
            config_id="",
        )


@dataclass(frozen=True, slots=True)
class ConversationScope:
    """Who a conversation's session belongs to: one turn of an Agent App conversation.

    The session key is ``(tenant_id, conversation_id, binding_id, agent_id,
    agent_config_snapshot_id)``: a turn with another configuration snapshot starts fresh and
    retires the session of the previous one. ``message_id`` names the turn (the base of the
    backend idempotency key); ``app_id`` is saved with the session.
    """

    tenant_id: str
    app_id: str
    conversation_id: str
    binding_id: str
    agent_id: str
    agent_config_snapshot_id: str
    message_id: str

    def __post_init__(self) -> None:
        for name in ("tenant_id", "app_id", "conversation_id", "binding_id", "agent_id"):
            check_id(name, getattr(self, name))
        check_id("agent_config_snapshot_id", self.agent_config_snapshot_id)
        check_id("message_id", self.message_id)

    @property
    def key(self) -> SessionKey:
        return unchecked(  # the IDs were checked when this scope was made
            SessionKey,
            tenant_id=self.tenant_id,
            owner_id=self.conversation_id,
            node_id="",
            binding_id=self.binding_id,
            agent_id=self.agent_id,
            owner_type=_CONVERSATION,
            config_id=self.agent_config_snapshot_id,
        )


AnyScope: TypeAlias = Scope | ConversationScope
"""Whose session: a workflow node entry's or a conversation turn's."""


def unchecked(cls: type[T], **fields: object) -> T:
    """An instance without ``__post_init__``: for data this library validated when writing."""
    obj = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    return obj


def is_text(state: object) -> bool:
    """Whether a layer's runtime state is still its JSON text (read from JSON, not decoded)."""
    return type(state) is msgspec.Raw


class SnapshotLayer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The state of one compositor layer between backend runs (wire, Redis and Postgres)."""

    name: str
    lifecycle_state: LifecycleState
    runtime_state: dict[str, JsonValue] = msgspec.field(default_factory=dict)


class Snapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The agent's layer states between backend runs, in compositor order.

    One type from the backend's JSON to Redis and Postgres, both of which store its JSON
    text. Read from JSON, a snapshot keeps each layer's state as that text
    (:class:`cache.snapshot_json.RawSnapshot`) until :meth:`decoded`;
    :func:`cache.snapshot_json.encode_checked` checks a snapshot once, when it is saved.
    Constructing one does not validate it.
    """

    layers: tuple[SnapshotLayer, ...]
    schema_version: int = SNAPSHOT_SCHEMA_VERSION

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

    def __eq__(self, other: object) -> bool:
        """Equal layers and values, whether a state is held as JSON text or as values."""
        if not isinstance(other, Snapshot):
            return NotImplemented
        mine, theirs = self.decoded(), other.decoded()
        return (mine.schema_version, mine.layers) == (theirs.schema_version, theirs.layers)

    __hash__ = None  # type: ignore[assignment]

    def decoded(self) -> Snapshot:
        """This snapshot with every layer's state as Python values (itself if it has no
        state still held as JSON text)."""
        if any(is_text(layer.runtime_state) for layer in self.layers):
            return _SNAPSHOT_JSON.decode(_JSON.encode(self))
        return self

    def to_dict(self) -> dict[str, JsonValue]:
        return msgspec.to_builtins(self.decoded())  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: object) -> Snapshot:
        """A snapshot from JSON-like builtins; :class:`InvalidSnapshot` if the shape is wrong
        (its values are checked when it is saved)."""
        return _convert(data, cls, "snapshot")


_JSON = msgspec.json.Encoder()
_SNAPSHOT_JSON = msgspec.json.Decoder(Snapshot)


class LayerSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One replayable, credential-free layer of the composition that produced a snapshot.

    The same type is a layer of the composition sent to the backend (``RunLayerSpec``).
    """

    name: str
    type: str
    deps: dict[str, str] = msgspec.field(default_factory=dict)
    metadata: dict[str, JsonValue] = msgspec.field(default_factory=dict)
    config: JsonValue = None

    def to_dict(self) -> dict[str, JsonValue]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: object) -> LayerSpec:
        return _convert(data, cls, "layer spec")


_Converted = TypeVar("_Converted")


def _convert(data: object, kind: type[_Converted], what: str) -> _Converted:
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise InvalidSnapshot(f"{what}: {exc}") from None


def specs_from_list(data: object) -> tuple[LayerSpec, ...]:
    return _convert(data, tuple[LayerSpec, ...], "layer specs")


@dataclass(frozen=True, slots=True)
class SessionWrite:
    """Everything a save writes besides status and version (which the script owns)."""

    snapshot: Snapshot
    layer_specs: tuple[LayerSpec, ...]
    app_id: str
    workflow_id: str | None
    node_execution_id: str | None
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
        for name in ("app_id", "agent_config_snapshot_id"):
            check_id(name, getattr(self, name))
        for name in (
            "workflow_id",
            "node_execution_id",
            "backend_run_id",
            "pending_form_id",
            "pending_tool_call_id",
        ):
            check_optional_id(name, getattr(self, name))

    @classmethod
    def for_scope(
        cls,
        scope: AnyScope,
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
            workflow_id=scope.workflow_id if isinstance(scope, Scope) else None,
            node_execution_id=scope.node_execution_id if isinstance(scope, Scope) else None,
            agent_config_snapshot_id=scope.agent_config_snapshot_id,
            backend_run_id=backend_run_id,
            pending_form_id=pending_form_id,
            pending_tool_call_id=pending_tool_call_id,
        )


def check_write_fits(key: SessionKey, write: SessionWrite) -> None:
    """:class:`InvalidInput` unless ``write`` may be saved under ``key``: a workflow run's
    session names its workflow and node execution; a conversation's is saved with the config
    snapshot of its key."""
    if key.owner_type is _WORKFLOW:
        for name in ("workflow_id", "node_execution_id"):
            if not getattr(write, name):
                raise InvalidInput(f"{name}: a workflow run's session is saved with one")
    elif write.agent_config_snapshot_id != key.config_id:
        raise InvalidInput(
            "agent_config_snapshot_id: a conversation's session is saved with the config "
            f"snapshot of its key ({key.config_id!r}), got {write.agent_config_snapshot_id!r}"
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
    content_id: str | None = None
    """The id of the save whose snapshot this is (``lua/save.lua``; kept by every other
    change of the session): the flush fence tells two saves of one version apart by it."""
    snapshot_raw: bytes | None = field(default=None, compare=False, repr=False)
    """The snapshot's stored bytes (its JSON; an earlier build's msgpack), when it was read
    from Redis or Postgres: written on as they are, never encoded again."""

    @property
    def snapshot(self) -> Snapshot:
        """The snapshot with its states as Python values (decoded at each call: the hot path
        reads ``data.snapshot``, whose states are still JSON text)."""
        return self.data.snapshot.decoded()

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        return self.data.layer_specs

    @property
    def dirty(self) -> bool:
        return self.version > self.flushed_version
