"""The Postgres-only session store, written the way the original is (the comparison arm).

What it reproduces (the original Postgres-only store, §1.3 and §3.3 of its domain reference):

- an SQLAlchemy ORM model of ``workflow_agent_runtime_sessions`` (here named
  :data:`TABLE`, so it can sit next to ours in one database): a uuid primary key, the scope
  columns, ``session_snapshot`` and ``composition_layer_specs`` as JSON text (``LongText``;
  Postgres ``text`` with the default pglz TOAST compression), ``status``, ``cleaned_at``,
  ``created_at``/``updated_at`` (ORM ``onupdate``); unique on the five key columns, a lookup
  index on ``(tenant_id, workflow_run_id, node_id, status)``, an index on ``backend_run_id``;
- every method opens its own ORM ``Session`` and commits (no cross-call transaction);
- ``load_active_session``: ``select`` by the five key columns **and** ``status = active``,
  the JSON decoded with pydantic (``CompositorSessionSnapshot``, a layer-spec list);
- ``save_active_snapshot``: ``select`` by the five key columns ignoring status, then update
  the attributes in place (a ``cleaned`` row comes back ``active``) or ``session.add`` a new
  row, then ``commit()`` — read-then-write, one transaction per save;
- ``list_active_sessions`` / ``mark_cleaned`` for the workflow-terminal cleanup, which the
  original runs in line, session after session: create the cleanup run, wait for it, mark
  the row ``cleaned`` only when it succeeded (§3.5, the HTTP path).

Like Dify's default engine there is no ``pool_pre_ping``; the driver is psycopg 3, the same
one our repository uses, so driver differences do not count for or against either side.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from agent_backend.client import AgentBackendClient
from agent_backend.models import CreateRunRequest, LayerExitSignals, RunComposition
from cache.records import ConversationScope, LayerSpec, Scope, Snapshot

TABLE: Final = "original_agent_runtime_sessions"
ACTIVE: Final = "active"
CLEANED: Final = "cleaned"
KEY_COLUMNS: Final = ("tenant_id", "workflow_run_id", "node_id", "binding_id", "agent_id")


class _Original(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunLayerSpec(_Original):
    """The original's layer spec (dify-agent's pydantic DTO)."""

    name: str
    type: str
    deps: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    config: JsonValue = None


class LayerSessionSnapshot(_Original):
    name: str
    lifecycle_state: str
    runtime_state: dict[str, JsonValue]


class CompositorSessionSnapshot(_Original):
    """The original's snapshot (dify-agent's pydantic DTO): what its node loads and saves."""

    schema_version: int = 1
    layers: list[LayerSessionSnapshot]


_SPECS: Final = TypeAdapter(list[RunLayerSpec])


def original_snapshot(snapshot: Snapshot) -> CompositorSessionSnapshot:
    """Our snapshot as the original's pydantic object (set-up, not timed)."""
    return CompositorSessionSnapshot.model_validate(msgspec.to_builtins(snapshot.decoded()))


def original_specs(specs: Sequence[LayerSpec]) -> list[RunLayerSpec]:
    return _SPECS.validate_python(msgspec.to_builtins(list(specs)))


def naive_utc_now() -> datetime:
    """The original stores naive UTC timestamps."""
    return datetime.now(UTC).replace(tzinfo=None)


def _uuid() -> Mapped[str]:
    return mapped_column(sa.Uuid(as_uuid=False), nullable=False)


class Base(DeclarativeBase):
    pass


class OriginalSession(Base):
    """The ORM row: one per five-part key, whatever its status."""

    __tablename__ = TABLE
    __table_args__ = (
        sa.UniqueConstraint(*KEY_COLUMNS, name="original_agent_runtime_session_scope_unique"),
        sa.Index(
            "original_agent_runtime_session_lookup_idx",
            "tenant_id",
            "workflow_run_id",
            "node_id",
            "status",
        ),
        sa.Index("original_agent_runtime_session_backend_run_idx", "backend_run_id"),
    )

    id: Mapped[str] = mapped_column(
        sa.Uuid(as_uuid=False), primary_key=True, default=lambda: str(uuid.uuid4())
    )
    tenant_id: Mapped[str] = _uuid()
    app_id: Mapped[str] = _uuid()
    workflow_id: Mapped[str] = _uuid()
    workflow_run_id: Mapped[str] = _uuid()
    node_id: Mapped[str] = mapped_column(sa.String(255), nullable=False)
    node_execution_id: Mapped[str | None] = mapped_column(sa.String(255))
    binding_id: Mapped[str] = _uuid()
    agent_id: Mapped[str] = _uuid()
    agent_config_snapshot_id: Mapped[str] = _uuid()
    backend_run_id: Mapped[str | None] = mapped_column(sa.String(255))
    session_snapshot: Mapped[str] = mapped_column(sa.Text, nullable=False)
    composition_layer_specs: Mapped[str] = mapped_column(sa.Text, nullable=False)
    status: Mapped[str] = mapped_column(sa.String(32), nullable=False, server_default=ACTIVE)
    cleaned_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    created_at: Mapped[datetime] = mapped_column(
        sa.DateTime, nullable=False, default=naive_utc_now, server_default=sa.func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        sa.DateTime,
        nullable=False,
        default=naive_utc_now,
        server_default=sa.func.now(),
        onupdate=sa.func.current_timestamp(),
    )


@dataclass(frozen=True, slots=True)
class StoredOriginal:
    """What a load returns: the snapshot to thread into the next request, and its specs."""

    scope: Scope
    session_snapshot: CompositorSessionSnapshot
    backend_run_id: str | None
    layer_specs: list[RunLayerSpec]


def create_engine(database_url: str) -> Engine:
    """A pooled psycopg 3 engine, as Dify's ``db.engine`` is (no pre-ping)."""
    url = sa.engine.make_url(database_url).set(drivername="postgresql+psycopg")
    return sa.create_engine(url)


def create_table(database_url: str) -> None:
    """Create :data:`TABLE` and its indexes in the database of ``database_url``."""
    engine = create_engine(database_url)
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()


def _key_filter(scope: Scope) -> list[sa.ColumnElement[bool]]:
    return [
        OriginalSession.tenant_id == scope.tenant_id,
        OriginalSession.workflow_run_id == scope.workflow_run_id,
        OriginalSession.node_id == scope.node_id,
        OriginalSession.binding_id == scope.binding_id,
        OriginalSession.agent_id == scope.agent_id,
    ]


class OriginalSessionStore:
    """``WorkflowAgentRuntimeSessionStore`` of the original: one ORM session per call."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load_active_session(self, scope: Scope) -> StoredOriginal | None:
        if scope.workflow_run_id is None:
            return None
        query = sa.select(OriginalSession).where(
            *_key_filter(scope), OriginalSession.status == ACTIVE
        )
        with Session(self.engine, expire_on_commit=False) as session:
            row = session.execute(query).scalar_one_or_none()
            if row is None:
                return None
            return _stored(scope, row)

    def save_active_snapshot(
        self,
        scope: Scope,
        *,
        backend_run_id: str | None,
        snapshot: CompositorSessionSnapshot | None,
        layer_specs: Sequence[RunLayerSpec],
    ) -> None:
        """Read by key (any status), update in place or insert, commit."""
        if scope.workflow_run_id is None or snapshot is None:
            return
        values = _saved_values(scope, backend_run_id, snapshot, layer_specs)
        with Session(self.engine, expire_on_commit=False) as session:
            row = session.execute(
                sa.select(OriginalSession).where(*_key_filter(scope))
            ).scalar_one_or_none()
            if row is None:
                session.add(OriginalSession(**_scope_values(scope), **values))
            else:
                for name, value in values.items():
                    setattr(row, name, value)
            session.commit()

    def list_active_sessions(self, workflow_run_id: str) -> list[StoredOriginal]:
        """Every active row of the run (the original has no tenant filter here)."""
        query = sa.select(OriginalSession).where(
            OriginalSession.workflow_run_id == workflow_run_id, OriginalSession.status == ACTIVE
        )
        with Session(self.engine, expire_on_commit=False) as session:
            return [_stored(_scope_of(row), row) for row in session.execute(query).scalars()]

    def mark_cleaned(self, scope: Scope, backend_run_id: str | None = None) -> None:
        if scope.workflow_run_id is None:
            return
        query = sa.select(OriginalSession).where(
            *_key_filter(scope), OriginalSession.status == ACTIVE
        )
        with Session(self.engine, expire_on_commit=False) as session:
            row = session.execute(query).scalar_one_or_none()
            if row is None:
                return
            row.status = CLEANED
            row.cleaned_at = naive_utc_now()
            if backend_run_id is not None:
                row.backend_run_id = backend_run_id
            session.commit()


def _scope_values(scope: Scope) -> dict[str, Any]:
    return {
        "tenant_id": scope.tenant_id,
        "app_id": scope.app_id,
        "workflow_id": scope.workflow_id,
        "workflow_run_id": scope.workflow_run_id,
        "node_id": scope.node_id,
        "binding_id": scope.binding_id,
        "agent_id": scope.agent_id,
    }


def _saved_values(
    scope: Scope,
    backend_run_id: str | None,
    snapshot: CompositorSessionSnapshot,
    layer_specs: Sequence[RunLayerSpec],
) -> dict[str, Any]:
    return {
        "node_execution_id": scope.node_execution_id,
        "agent_config_snapshot_id": scope.agent_config_snapshot_id,
        "backend_run_id": backend_run_id,
        "session_snapshot": snapshot.model_dump_json(),
        "composition_layer_specs": _SPECS.dump_json(list(layer_specs)).decode(),
        "status": ACTIVE,
        "cleaned_at": None,
    }


def _stored(scope: Scope, row: OriginalSession) -> StoredOriginal:
    return StoredOriginal(
        scope=scope,
        session_snapshot=CompositorSessionSnapshot.model_validate_json(row.session_snapshot),
        backend_run_id=row.backend_run_id,
        layer_specs=_SPECS.validate_json(row.composition_layer_specs),
    )


def _scope_of(row: OriginalSession) -> Scope:
    return Scope(
        tenant_id=str(row.tenant_id),
        app_id=str(row.app_id),
        workflow_id=str(row.workflow_id),
        workflow_run_id=str(row.workflow_run_id),
        node_id=row.node_id,
        node_execution_id=row.node_execution_id or "unknown",
        binding_id=str(row.binding_id),
        agent_id=str(row.agent_id),
        agent_config_snapshot_id=str(row.agent_config_snapshot_id),
    )


# --------------------------------------------------------------------------- cleanup


def cleanup_request(stored: StoredOriginal) -> CreateRunRequest:
    """The original's cleanup run: specs replayed, snapshot filtered to them, delete on exit."""
    scope = stored.scope
    names = [spec.name for spec in stored.layer_specs]
    by_name = {layer.name: layer for layer in stored.session_snapshot.layers}
    kept = CompositorSessionSnapshot(layers=[by_name[n] for n in names if n in by_name])
    snapshot = msgspec.convert(kept.model_dump(mode="json"), Snapshot)
    specs = msgspec.convert(_SPECS.dump_python(stored.layer_specs, mode="json"), list[LayerSpec])
    return CreateRunRequest(
        composition=RunComposition(layers=specs),
        purpose="workflow_node",
        idempotency_key=(
            f"{scope.workflow_run_id}:{scope.node_id}:{scope.binding_id}:agent-session-cleanup"
        ),
        session_snapshot=snapshot,
        on_exit=LayerExitSignals(default="delete"),
        metadata={
            "tenant_id": scope.tenant_id,
            "workflow_run_id": scope.workflow_run_id,
            "node_id": scope.node_id,
            "previous_agent_backend_run_id": stored.backend_run_id,
            "agent_backend_lifecycle": "session_cleanup",
        },
    )


def cleanup_run_in_line(
    store: OriginalSessionStore,
    backend: AgentBackendClient,
    workflow_run_id: str,
    *,
    wait_s: float = 30.0,
) -> tuple[int, int]:
    """The original's terminal-event cleanup: each active row in turn, create + wait + mark.

    Returns ``(cleaned, left_active)``; a row whose cleanup did not succeed stays active.
    """
    cleaned = left = 0
    for stored in store.list_active_sessions(workflow_run_id):
        created = backend.create_run(cleanup_request(stored))
        status = backend.wait_run(created.run_id, timeout_s=wait_s)
        if status.status != "succeeded":
            left += 1
            continue
        store.mark_cleaned(stored.scope, backend_run_id=created.run_id)
        cleaned += 1
    return cleaned, left


# ------------------------------------------------------------------ conversations (LATER)

CONVERSATION_TABLE: Final = "original_agent_app_runtime_sessions"


class OriginalConversationSession(Base):
    """The original's unified row (reference §1.4) as a conversation writes it: owner
    ``conversation``, the workflow columns NULL, ``composition_layer_specs`` the literal
    ``"[]"``; a partial unique index on ``(tenant_id, conversation_id, agent_id,
    agent_config_snapshot_id)`` and a lookup index on ``(tenant_id, conversation_id,
    status)``. Its own table, so it can sit next to the workflow arm's."""

    __tablename__ = CONVERSATION_TABLE
    __table_args__ = (
        sa.Index(
            "original_agent_runtime_session_conversation_scope_unique",
            "tenant_id",
            "conversation_id",
            "agent_id",
            "agent_config_snapshot_id",
            unique=True,
            postgresql_where=sa.text("conversation_id IS NOT NULL"),
        ),
        sa.Index(
            "original_agent_runtime_session_conversation_lookup_idx",
            "tenant_id",
            "conversation_id",
            "status",
        ),
    )

    id: Mapped[str] = mapped_column(
        sa.Uuid(as_uuid=False), primary_key=True, default=lambda: str(uuid.uuid4())
    )
    tenant_id: Mapped[str] = _uuid()
    app_id: Mapped[str] = _uuid()
    owner_type: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    workflow_id: Mapped[str | None] = mapped_column(sa.Uuid(as_uuid=False))
    workflow_run_id: Mapped[str | None] = mapped_column(sa.Uuid(as_uuid=False))
    node_id: Mapped[str | None] = mapped_column(sa.String(255))
    node_execution_id: Mapped[str | None] = mapped_column(sa.String(255))
    binding_id: Mapped[str | None] = mapped_column(sa.Uuid(as_uuid=False))
    agent_id: Mapped[str] = _uuid()
    agent_config_snapshot_id: Mapped[str | None] = mapped_column(sa.Uuid(as_uuid=False))
    conversation_id: Mapped[str | None] = mapped_column(sa.Uuid(as_uuid=False))
    backend_run_id: Mapped[str | None] = mapped_column(sa.String(255))
    session_snapshot: Mapped[str] = mapped_column(sa.Text, nullable=False)
    composition_layer_specs: Mapped[str] = mapped_column(
        sa.Text, nullable=False, server_default="[]"
    )
    status: Mapped[str] = mapped_column(sa.String(32), nullable=False, server_default=ACTIVE)
    cleaned_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    created_at: Mapped[datetime] = mapped_column(
        sa.DateTime, nullable=False, default=naive_utc_now, server_default=sa.func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        sa.DateTime,
        nullable=False,
        default=naive_utc_now,
        server_default=sa.func.now(),
        onupdate=sa.func.current_timestamp(),
    )


def _conversation_filter(scope: ConversationScope) -> list[sa.ColumnElement[bool]]:
    row = OriginalConversationSession
    return [
        row.owner_type == "conversation",
        row.tenant_id == scope.tenant_id,
        row.conversation_id == scope.conversation_id,
        row.agent_id == scope.agent_id,
        row.agent_config_snapshot_id == scope.agent_config_snapshot_id,
    ]


class OriginalConversationStore:
    """``AgentAppRuntimeSessionStore`` of the original: the workflow store's semantics on
    the conversation scope (load the active row; save reads by key, updates or inserts,
    commits; a ``cleaned`` row comes back ``active``; specs stored as ``"[]"``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load(self, scope: ConversationScope) -> CompositorSessionSnapshot | None:
        query = sa.select(OriginalConversationSession).where(
            *_conversation_filter(scope), OriginalConversationSession.status == ACTIVE
        )
        with Session(self.engine, expire_on_commit=False) as session:
            row = session.execute(query).scalar_one_or_none()
            if row is None:
                return None
            return CompositorSessionSnapshot.model_validate_json(row.session_snapshot)

    def save(
        self,
        scope: ConversationScope,
        *,
        backend_run_id: str | None,
        snapshot: CompositorSessionSnapshot | None,
    ) -> None:
        if snapshot is None:
            return
        values = {
            "backend_run_id": backend_run_id,
            "session_snapshot": snapshot.model_dump_json(),
            "composition_layer_specs": "[]",
            "status": ACTIVE,
            "cleaned_at": None,
        }
        with Session(self.engine, expire_on_commit=False) as session:
            row = session.execute(
                sa.select(OriginalConversationSession).where(*_conversation_filter(scope))
            ).scalar_one_or_none()
            if row is None:
                session.add(
                    OriginalConversationSession(
                        owner_type="conversation",
                        tenant_id=scope.tenant_id,
                        app_id=scope.app_id,
                        conversation_id=scope.conversation_id,
                        agent_id=scope.agent_id,
                        agent_config_snapshot_id=scope.agent_config_snapshot_id,
                        **values,
                    )
                )
            else:
                for name, value in values.items():
                    setattr(row, name, value)
            session.commit()
