"""Small typed builders for the hot-store tests (scopes, keys, snapshots, writes, records).

Every builder takes the few IDs a test cares about and fills the rest with valid defaults, so
a test reads as the invariant it checks. Other test modules may import these freely.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cache.client import RedisClient
from cache.keys import KeySpace
from cache.records import (
    ConversationScope,
    LayerSpec,
    LifecycleState,
    Owner,
    Scope,
    SessionKey,
    SessionStatus,
    SessionWrite,
    Snapshot,
    SnapshotLayer,
    StoredSession,
    unchecked,
)

TENANT = "tenant-1"
RUN = "run-1"


def scope(
    *,
    tenant: str = TENANT,
    run: str | None = RUN,
    node: str = "node-1",
    binding: str = "binding-1",
    agent: str = "agent-1",
    node_execution: str = "exec-1",
) -> Scope:
    """A valid scope; ``run=None`` is a debug run that has no session."""
    return Scope(
        tenant_id=tenant,
        app_id="app-1",
        workflow_id="workflow-1",
        workflow_run_id=run,
        node_id=node,
        node_execution_id=node_execution,
        binding_id=binding,
        agent_id=agent,
        agent_config_snapshot_id="config-1",
    )


def session_key(
    *,
    tenant: str = TENANT,
    run: str = RUN,
    node: str = "node-1",
    binding: str = "binding-1",
    agent: str = "agent-1",
) -> SessionKey:
    return SessionKey(tenant, run, node, binding, agent)


def conversation_scope(
    *,
    tenant: str = TENANT,
    conversation: str = "conversation-1",
    config: str = "config-1",
    message: str = "message-1",
) -> ConversationScope:
    """A valid turn of a conversation (binding-1, agent-1)."""
    return ConversationScope(
        tenant_id=tenant,
        app_id="app-1",
        conversation_id=conversation,
        binding_id="binding-1",
        agent_id="agent-1",
        agent_config_snapshot_id=config,
        message_id=message,
    )


def run_ref(*, tenant: str = TENANT, run: str = RUN) -> Owner:
    return Owner(tenant, run)


def run_of(key: SessionKey) -> Owner:
    return key.owner


def snapshot(*layers: str, state: dict[str, object] | None = None) -> Snapshot:
    """A snapshot with the named layers (default: ``history``), all suspended."""
    names = layers or ("history",)
    return Snapshot(
        layers=tuple(
            SnapshotLayer(name, LifecycleState.SUSPENDED, dict(state or {})) for name in names
        )
    )


def snapshot_of_size(payload_bytes: int) -> Snapshot:
    """A one-layer snapshot whose runtime state holds a string of ``payload_bytes`` ASCII bytes.

    The encoded snapshot is ``payload_bytes`` plus a few dozen bytes of JSON framing.
    """
    return Snapshot(
        layers=(SnapshotLayer("history", LifecycleState.SUSPENDED, {"blob": "x" * payload_bytes}),)
    )


def specs(*names: str) -> tuple[LayerSpec, ...]:
    """Layer specs for ``names`` (default: ``history``), each depending on the previous one."""
    chosen = names or ("history",)
    out: list[LayerSpec] = []
    for i, name in enumerate(chosen):
        deps = {"prev": chosen[i - 1]} if i else {}
        out.append(LayerSpec(name, f"test.{name}", deps, {"i": i}, {"n": i}))
    return tuple(out)


def session_write(
    snap: Snapshot | None = None,
    layer_specs: tuple[LayerSpec, ...] | None = None,
    *,
    of: Scope | ConversationScope | None = None,
    backend_run_id: str | None = "backend-run-1",
    pending_form_id: str | None = None,
    pending_tool_call_id: str | None = None,
) -> SessionWrite:
    return SessionWrite.for_scope(
        of or scope(),
        snap if snap is not None else snapshot(),
        layer_specs if layer_specs is not None else specs(),
        backend_run_id=backend_run_id,
        pending_form_id=pending_form_id,
        pending_tool_call_id=pending_tool_call_id,
    )


def stored_session(
    key: SessionKey,
    *,
    version: int = 1,
    flushed_version: int | None = None,
    status: SessionStatus = SessionStatus.ACTIVE,
    write: SessionWrite | None = None,
) -> StoredSession:
    """A session as Postgres would return it; ``flushed_version`` defaults to ``version``."""
    return StoredSession(
        key=key,
        status=status,
        version=version,
        data=write or session_write(),
        flushed_version=version if flushed_version is None else flushed_version,
        created_at="2024-01-01T00:00:00.000+00:00",
        updated_at="2024-01-01T00:00:00.000+00:00",
    )


def bypassing_checks_key(**parts: str) -> SessionKey:
    """A session key built without the input checks, as an older version or another writer
    might have stored it: Postgres refusing it must still be handled, not crash a flush."""
    defaults = session_key()
    fields = {name: parts.get(name, getattr(defaults, name)) for name in SessionKey.__slots__}
    return unchecked(SessionKey, **fields)


def bypassing_checks_spec(config: object) -> LayerSpec:
    """A layer spec built without the input checks (see :func:`bypassing_checks_key`)."""
    return unchecked(
        LayerSpec, name="history", type="pydantic_ai.history", deps={}, metadata={}, config=config
    )


def keys_in_shard(
    space: KeySpace, shard: int, *, tenant: str = TENANT, prefix: str = "run"
) -> Iterator[SessionKey]:
    """Endless session keys (one per run) whose run lands in ``shard`` of ``space``."""
    i = 0
    while True:
        run = f"{prefix}-{i}"
        i += 1
        if space.shard_of(tenant, run) == shard:
            yield session_key(tenant=tenant, run=run)


def redis_state(client: RedisClient) -> dict[bytes, tuple[bytes, Any, str]]:
    """Every key with its type, full value and TTL kind (``none``/``set``): "nothing written".

    Works on standalone Redis and on RedisCluster (whose ``scan_iter`` visits every primary;
    its ``KEYS`` would ask one random node only).
    """
    state: dict[bytes, tuple[bytes, Any, str]] = {}
    for key in client.scan_iter("*"):
        kind = client.type(key)
        value: Any
        if kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            value = client.smembers(key)
        else:
            value = client.dump(key)
        pttl = int(client.pttl(key))  # type: ignore[arg-type]
        state[key] = (kind, value, "none" if pttl == -1 else "set")
    return state
