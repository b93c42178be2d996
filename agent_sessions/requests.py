"""The request a node sends the agent backend: the replayable layers of a composition, the
history layer, the idempotency key of an attempt and the scope's IDs in the metadata."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from agent_backend.models import RunComposition, RunLayerSpec, encode_json
from cache.errors import InvalidInput
from cache.records import AnyScope, ConversationScope, LayerSpec
from cache.validate import check_json

CREDENTIAL_LAYER_TYPES = frozenset({"dify.plugin.llm", "dify.plugin.tools", "dify_core_tools"})
HISTORY_LAYER = RunLayerSpec(
    name="history", type="pydantic_ai.history", metadata={"origin": "agent_session_history"}
)


def extract_layer_specs(composition: RunComposition) -> tuple[LayerSpec, ...]:
    """The replayable layers of a composition: everything but credential-bearing plugins."""
    return tuple(layer for layer in composition.layers if layer.type not in CREDENTIAL_LAYER_TYPES)


def with_history(composition: RunComposition) -> RunComposition:
    """The composition with a ``history`` layer, before the model layer, unless it has one."""
    layers = composition.layers
    if any(x.name == HISTORY_LAYER.name or x.type == HISTORY_LAYER.type for x in layers):
        return composition
    at = next((i for i, x in enumerate(layers) if x.type in CREDENTIAL_LAYER_TYPES), len(layers))
    return msgspec.structs.replace(composition, layers=[*layers[:at], HISTORY_LAYER, *layers[at:]])


def idempotency_key(scope: AnyScope, attempt: int) -> str:
    """``<run>:<node execution>`` or ``<conversation>:<message>``, ``:retry-n`` for n >= 1."""
    if isinstance(scope, ConversationScope):
        base = f"{scope.conversation_id}:{scope.message_id}"
    else:
        base = scope.node_execution_id
        if scope.workflow_run_id is not None:
            base = f"{scope.workflow_run_id}:{base}"
    return f"{base}:retry-{attempt}" if attempt >= 1 else base


def scope_metadata(scope: AnyScope) -> dict[str, object]:
    if isinstance(scope, ConversationScope):
        return {
            "tenant_id": scope.tenant_id,
            "app_id": scope.app_id,
            "owner_type": "conversation",
            "conversation_id": scope.conversation_id,
            "message_id": scope.message_id,
            "binding_id": scope.binding_id,
            "agent_id": scope.agent_id,
            "agent_config_snapshot_id": scope.agent_config_snapshot_id,
        }
    return {
        "tenant_id": scope.tenant_id,
        "app_id": scope.app_id,
        "workflow_id": scope.workflow_id,
        "workflow_run_id": scope.workflow_run_id,
        "node_id": scope.node_id,
        "node_execution_id": scope.node_execution_id,
        "binding_id": scope.binding_id,
        "agent_id": scope.agent_id,
        "agent_config_snapshot_id": scope.agent_config_snapshot_id,
    }


def request_metadata(scope: AnyScope, metadata: object) -> dict[str, object]:
    """The caller's ``metadata`` with the scope's IDs over it. Only the caller's part is
    checked: the scope's is IDs its constructor checked."""
    if metadata is not None and not isinstance(metadata, Mapping):
        raise InvalidInput(f"metadata must be a mapping, got {type(metadata).__name__}")
    ours = scope_metadata(scope)
    theirs = {k: v for k, v in (metadata or {}).items() if k not in ours}
    if theirs:
        check_json("request metadata", theirs)
        try:  # what check_json leaves to encoding: text JSON cannot hold (lone surrogates)
            encode_json(theirs)
        except ValueError as exc:
            raise InvalidInput(f"request metadata cannot be sent as JSON: {exc}") from exc
    return {**theirs, **ours}
