"""Protocol models: exact converter round trips, forbidden extras, small helpers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import BaseModel, ValidationError

from cache.errors import InvalidSnapshot
from cache.records import LayerSpec, LifecycleState, Snapshot, SnapshotLayer
from workers.backend_models import (
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
    composition_from_specs,
    is_terminal,
    snapshot_from_protocol,
    snapshot_to_protocol,
    spec_from_protocol,
    spec_to_protocol,
)

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


@pytest.mark.parametrize("schema_version", [1, 2])
def test_snapshot_round_trip_is_exact(schema_version: int) -> None:
    snapshot = make_snapshot(schema_version)
    wire = snapshot_to_protocol(snapshot)
    assert wire.schema_version == schema_version
    assert wire.layer_names() == snapshot.layer_names()
    assert [layer.lifecycle_state for layer in wire.layers] == ["new", "suspended", "closed"]
    back = snapshot_from_protocol(wire)
    assert back == snapshot
    assert type(back.layers[2].lifecycle_state) is LifecycleState
    assert back.layers[1].runtime_state["bool"] is True
    assert back.layers[1].runtime_state["int"] == 2**53 + 1


def test_snapshot_round_trip_through_json_is_exact() -> None:
    wire = snapshot_to_protocol(make_snapshot())
    reparsed = CompositorSessionSnapshot.model_validate_json(wire.model_dump_json())
    assert reparsed == wire
    assert snapshot_from_protocol(reparsed) == make_snapshot()
    assert snapshot_to_protocol(snapshot_from_protocol(wire)) == wire


def test_empty_snapshot_round_trips() -> None:
    empty = Snapshot(layers=())
    assert snapshot_from_protocol(snapshot_to_protocol(empty)) == empty


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_spec_round_trip_is_exact(spec: LayerSpec) -> None:
    wire = spec_to_protocol(spec)
    assert wire.model_dump() == spec.to_dict()
    assert spec_from_protocol(wire) == spec
    assert spec_from_protocol(RunLayerSpec.model_validate_json(wire.model_dump_json())) == spec


def test_composition_from_specs_keeps_order() -> None:
    composition = composition_from_specs(SPECS)
    assert composition.layer_names() == tuple(spec.name for spec in SPECS)
    assert [spec_from_protocol(layer) for layer in composition.layers] == SPECS


def test_non_json_runtime_state_is_refused_before_it_reaches_the_wire() -> None:
    with pytest.raises(InvalidSnapshot):
        Snapshot(layers=(SnapshotLayer("h", LifecycleState.NEW, {"x": object()}),))


def test_non_json_spec_config_is_refused_before_it_reaches_the_wire() -> None:
    with pytest.raises(InvalidSnapshot):
        LayerSpec("x", "plain.prompt", config={1, 2})


def test_duplicate_wire_layer_names_are_invalid_snapshot() -> None:
    layer = LayerSessionSnapshot(name="h", lifecycle_state="new", runtime_state={})
    with pytest.raises(InvalidSnapshot):
        snapshot_from_protocol(CompositorSessionSnapshot(layers=[layer, layer]))


def test_active_lifecycle_state_is_rejected() -> None:
    with pytest.raises(ValidationError):
        LayerSessionSnapshot.model_validate(
            {"name": "h", "lifecycle_state": "active", "runtime_state": {}}
        )


NOW = datetime(2025, 1, 1, tzinfo=UTC)
VALID: list[tuple[type[BaseModel], dict[str, object]]] = [
    (RunLayerSpec, {"name": "a", "type": "t"}),
    (RunComposition, {"layers": []}),
    (LayerSessionSnapshot, {"name": "a", "lifecycle_state": "new", "runtime_state": {}}),
    (CompositorSessionSnapshot, {"layers": []}),
    (LayerExitSignals, {}),
    (CreateRunRequest, {"composition": {"layers": []}}),
    (CreateRunResponse, {"run_id": "r", "status": "running"}),
    (RunStatusResponse, {"run_id": "r", "status": "failed", "created_at": NOW, "updated_at": NOW}),
    (CancelRunRequest, {}),
    (CancelRunResponse, {"run_id": "r", "status": "cancelled"}),
]


@pytest.mark.parametrize(("model", "data"), VALID, ids=lambda v: getattr(v, "__name__", ""))
def test_extra_fields_are_rejected(model: type[BaseModel], data: dict[str, object]) -> None:
    model.model_validate(data)
    with pytest.raises(ValidationError, match="extra"):
        model.model_validate({**data, "surprise": 1})


def test_nested_extra_fields_are_rejected() -> None:
    body = {"composition": {"layers": [{"name": "a", "type": "t", "secret": "x"}]}}
    with pytest.raises(ValidationError):
        CreateRunRequest.model_validate(body)


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
    with pytest.raises(ValidationError):
        LayerExitSignals.model_validate({"default": "keep"})


def test_terminal_statuses() -> None:
    assert not is_terminal("running")
    assert all(is_terminal(s) for s in ("paused", "succeeded", "failed", "cancelled"))
    with pytest.raises(ValidationError):
        CreateRunResponse.model_validate({"run_id": "r", "status": "done"})
