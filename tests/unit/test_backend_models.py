"""Protocol types: one snapshot type on the wire and in the store, exact JSON round trips,
forbidden extras, the door checks, small helpers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from agent_backend.models import (
    CancelRunRequest,
    CancelRunResponse,
    CompositorSessionSnapshot,
    CreateRunRequest,
    CreateRunResponse,
    LayerExitSignals,
    LayerSessionSnapshot,
    RunComposition,
    RunLayerSpec,
    RunStatusResponse,
    WireRunStatus,
    composition_from_specs,
    decode_json,
    decode_status,
    encode_json,
    is_terminal,
)
from cache.codec import check_specs, encode
from cache.errors import InvalidSnapshot
from cache.records import LayerSpec, LifecycleState, Snapshot, SnapshotLayer
from cache.snapshot_json import decode, encode_checked, frame_of

RICH_STATE = {
    "messages": [{"role": "assistant", "text": "héllo ✓", "n": 1}],
    "float": 1.5,
    "int": 2**53 + 1,
    "bool": True,
    "none": None,
    "nested": {"list": [1, "two", [3.0, False]], "empty": {}},
}


def make_snapshot(schema_version: int = 1) -> Snapshot:
    return Snapshot(
        layers=(
            SnapshotLayer("workflow_node_job_prompt", LifecycleState.NEW),
            SnapshotLayer("history", LifecycleState.SUSPENDED, dict(RICH_STATE)),
            SnapshotLayer("llm", LifecycleState.CLOSED, {"handle": "x"}),
        ),
        schema_version=schema_version,
    )


SPECS = [
    LayerSpec("workflow_node_job_prompt", "plain.prompt", config={"prefix": "do it"}),
    LayerSpec(
        "execution_context",
        "dify.execution_context",
        metadata={"origin": "x", "n": 1},
        config={"tenant_id": "t", "ids": [1, 2.5, None, True]},
    ),
    LayerSpec("history", "pydantic_ai.history", deps={"ctx": "execution_context"}),
    LayerSpec("output", "dify.output", config=[{"a": 1}]),
    LayerSpec("scalar", "plain.prompt", config="just a string"),
]


def test_the_wire_types_are_the_stored_types() -> None:
    """One type end to end: no second model, no converter."""
    assert CompositorSessionSnapshot is Snapshot
    assert LayerSessionSnapshot is SnapshotLayer
    assert RunLayerSpec is LayerSpec


@pytest.mark.parametrize("schema_version", [1, 2])
def test_snapshot_round_trips_through_json_storage_and_legacy_msgpack_exactly(
    schema_version: int,
) -> None:
    snapshot = make_snapshot(schema_version)
    via_json = decode_json(Snapshot, encode_json(snapshot))
    stored = encode_checked(snapshot, 1 << 20)
    via_storage = decode(stored)
    via_msgpack = decode(encode("snapshot", snapshot))  # what an earlier build stored
    assert via_json == via_storage == via_msgpack == snapshot
    assert frame_of(stored) == snapshot and frame_of(encode("snapshot", snapshot)) == snapshot
    assert type(via_json.layers[2].lifecycle_state) is LifecycleState
    assert via_json.layers[1].runtime_state["bool"] is True
    assert via_json.layers[1].runtime_state["int"] == 2**53 + 1
    wire = msgspec.json.decode(encode_json(snapshot))
    assert [layer["lifecycle_state"] for layer in wire["layers"]] == ["new", "suspended", "closed"]


def test_empty_snapshot_round_trips() -> None:
    empty = Snapshot(layers=())
    assert decode_json(Snapshot, encode_json(empty)) == empty


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_spec_round_trip_is_exact(spec: LayerSpec) -> None:
    assert decode_json(LayerSpec, encode_json(spec)) == spec
    assert LayerSpec.from_dict(spec.to_dict()) == spec


def test_composition_from_specs_keeps_order() -> None:
    composition = composition_from_specs(SPECS)
    assert composition.layer_names() == tuple(spec.name for spec in SPECS)
    assert composition.layers == SPECS


def test_non_json_runtime_state_is_refused_at_the_door() -> None:
    bad = Snapshot(layers=(SnapshotLayer("h", LifecycleState.NEW, {"x": object()}),))
    with pytest.raises(InvalidSnapshot):
        encode_checked(bad, 1 << 20)


def test_non_json_spec_config_is_refused_at_the_door() -> None:
    with pytest.raises(InvalidSnapshot):
        check_specs([LayerSpec("x", "plain.prompt", config={1, 2})])


def test_duplicate_layer_names_are_refused_at_the_door() -> None:
    layer = SnapshotLayer(name="h", lifecycle_state=LifecycleState.NEW, runtime_state={})
    with pytest.raises(InvalidSnapshot, match="unique"):
        encode_checked(Snapshot(layers=(layer, layer)), 1 << 20)


def test_active_lifecycle_state_is_rejected_by_the_decoder() -> None:
    body = b'{"name": "h", "lifecycle_state": "active", "runtime_state": {}}'
    with pytest.raises(msgspec.ValidationError):
        decode_json(SnapshotLayer, body)


NOW = datetime(2025, 1, 1, tzinfo=UTC)
VALID: list[tuple[type[msgspec.Struct], dict[str, Any]]] = [
    (LayerSpec, {"name": "a", "type": "t"}),
    (RunComposition, {"layers": []}),
    (SnapshotLayer, {"name": "a", "lifecycle_state": "new", "runtime_state": {}}),
    (Snapshot, {"layers": []}),
    (LayerExitSignals, {}),
    (CreateRunRequest, {"composition": {"layers": []}}),
    (CreateRunResponse, {"run_id": "r", "status": "running"}),
    (RunStatusResponse, {"run_id": "r", "status": "failed", "created_at": NOW, "updated_at": NOW}),
    (CancelRunRequest, {}),
    (CancelRunResponse, {"run_id": "r", "status": "cancelled"}),
]


@pytest.mark.parametrize(("model", "data"), VALID, ids=lambda v: getattr(v, "__name__", ""))
def test_extra_fields_are_rejected(model: type[msgspec.Struct], data: dict[str, Any]) -> None:
    decode_json(model, msgspec.json.encode(data))
    with pytest.raises(msgspec.ValidationError, match="surprise"):
        decode_json(model, msgspec.json.encode({**data, "surprise": 1}))


def test_nested_extra_fields_are_rejected() -> None:
    body = b'{"composition": {"layers": [{"name": "a", "type": "t", "secret": "x"}]}}'
    with pytest.raises(msgspec.ValidationError):
        decode_json(CreateRunRequest, body)


def test_create_run_request_defaults() -> None:
    request = CreateRunRequest(composition=RunComposition(layers=[]))
    assert request.purpose == "workflow_node"
    assert request.idempotency_key is None
    assert request.session_snapshot is None
    assert request.on_exit == LayerExitSignals(default="suspend", layers={})


def test_exit_intent_per_layer_overrides_default() -> None:
    signals = LayerExitSignals(default="delete", layers={"history": "suspend"})
    assert signals.intent_for("history") == "suspend"
    assert signals.intent_for("llm") == "delete"
    with pytest.raises(msgspec.ValidationError):
        decode_json(LayerExitSignals, b'{"default": "keep"}')


def test_terminal_statuses() -> None:
    assert not is_terminal("running")
    assert all(is_terminal(s) for s in ("paused", "succeeded", "failed", "cancelled"))
    with pytest.raises(msgspec.ValidationError):
        decode_json(CreateRunResponse, b'{"run_id": "r", "status": "done"}')


def test_a_status_decoded_from_json_is_marked_as_such() -> None:
    """The mark that lets a save skip the value walk: only decode_status gives it."""
    status = RunStatusResponse(
        run_id="r",
        status="succeeded",
        created_at=NOW,
        updated_at=NOW,
        session_snapshot=make_snapshot(),
    )
    decoded = decode_status(encode_json(status))
    assert type(decoded) is WireRunStatus
    assert msgspec.structs.asdict(decoded) == msgspec.structs.asdict(status)
    assert type(status) is RunStatusResponse


@pytest.mark.parametrize("body", [b'{"v": NaN}', b'{"v": 1e999}', b'{"v": "\\ud800"}'])
def test_json_can_not_carry_what_the_store_refuses(body: bytes) -> None:
    """Why a snapshot decoded from JSON needs only its nesting checked."""
    with pytest.raises(msgspec.DecodeError):
        decode_json(dict[str, Any], body)
