"""Validation of the domain records (no services)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from cache import validate
from cache.codec import check_specs
from cache.errors import InvalidId, InvalidSnapshot
from cache.records import (
    LayerSpec,
    LifecycleState,
    Owner,
    OwnerType,
    Scope,
    SessionKey,
    SessionStatus,
    SessionWrite,
    Snapshot,
    SnapshotLayer,
    specs_from_list,
)
from cache.snapshot_json import decode, encode_checked
from cache.validate import MAX_ID_LENGTH, check_id
from tests import factories as f

BAD_IDS: list[Any] = ["", "x" * (MAX_ID_LENGTH + 1), None, 7, b"bytes", ["a"]]
KEY_FIELDS = ("tenant_id", "workflow_run_id", "node_id", "binding_id", "agent_id")


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_check_id_rejects_empty_overlong_and_non_string(bad: Any) -> None:
    with pytest.raises(InvalidId):
        check_id("tenant_id", bad)


def test_check_id_accepts_exactly_255_characters() -> None:
    value = "é" * MAX_ID_LENGTH  # characters, not bytes
    assert check_id("tenant_id", value) == value
    assert SessionKey(*(["x" * MAX_ID_LENGTH] * 5)).tenant_id == "x" * MAX_ID_LENGTH


@pytest.mark.parametrize("field", KEY_FIELDS)
@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_session_key_rejects_every_bad_part(field: str, bad: Any) -> None:
    parts: dict[str, Any] = dict.fromkeys(KEY_FIELDS, "ok")
    parts[field] = bad
    with pytest.raises(InvalidId, match=field):
        SessionKey(*(parts[name] for name in KEY_FIELDS))


CONVERSATION_KEY_FIELDS = (
    "tenant_id",
    "conversation_id",
    "binding_id",
    "agent_id",
    "agent_config_snapshot_id",
)


@pytest.mark.parametrize("field", CONVERSATION_KEY_FIELDS)
@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_conversation_session_key_rejects_every_bad_part(field: str, bad: Any) -> None:
    parts: dict[str, Any] = dict.fromkeys(CONVERSATION_KEY_FIELDS, "ok")
    parts[field] = bad
    with pytest.raises(InvalidId, match=field):
        SessionKey.conversation(*(parts[name] for name in CONVERSATION_KEY_FIELDS))


def test_a_key_has_exactly_its_owners_parts() -> None:
    with pytest.raises(InvalidId, match="config_id"):
        SessionKey("t", "r", "n", "b", "a", OwnerType.WORKFLOW_RUN, "cfg")
    with pytest.raises(InvalidId, match="node_id"):
        SessionKey("t", "c", "n", "b", "a", OwnerType.CONVERSATION, "cfg")
    with pytest.raises(InvalidId, match="owner_type"):
        SessionKey("t", "r", "n", "b", "a", "chat")  # type: ignore[arg-type]
    key = SessionKey.conversation("t", "c", "b", "a", "cfg")
    assert key.parts() == ("t", "c", "b", "a", "cfg")
    assert key.owner == Owner.conversation("t", "c")
    assert SessionKey.of_parts("conversation", *key.parts()) == key
    assert key != SessionKey("t", "c", "b", "a", "cfg")  # same IDs, other owner


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_run_ref_rejects_bad_ids(bad: Any) -> None:
    with pytest.raises(InvalidId):
        Owner("tenant", bad)
    with pytest.raises(InvalidId):
        Owner(bad, "run")


@pytest.mark.parametrize(
    "field",
    [
        "tenant_id",
        "app_id",
        "workflow_id",
        "node_id",
        "node_execution_id",
        "binding_id",
        "agent_id",
        "agent_config_snapshot_id",
        "workflow_run_id",
    ],
)
def test_scope_rejects_an_empty_id_in_any_field(field: str) -> None:
    fields: dict[str, Any] = {
        "tenant_id": "t",
        "app_id": "a",
        "workflow_id": "w",
        "workflow_run_id": "r",
        "node_id": "n",
        "node_execution_id": "e",
        "binding_id": "b",
        "agent_id": "g",
        "agent_config_snapshot_id": "c",
    }
    fields[field] = ""
    with pytest.raises(InvalidId, match=field):
        Scope(**fields)


def test_scope_key_is_the_five_key_ids_and_none_without_a_run() -> None:
    s = f.scope(tenant="t", run="r", node="n", binding="b", agent="g")
    assert s.key == SessionKey("t", "r", "n", "b", "g")
    assert f.scope(run=None).key is None


def test_a_scopes_key_follows_its_fields_through_copies_and_replace() -> None:
    s = f.scope(tenant="t", run="r", node="n", binding="b", agent="g")
    other = dataclasses.replace(s, node_id="n2")
    assert other.key == SessionKey("t", "r", "n2", "b", "g")
    assert dataclasses.replace(s) == s and hash(dataclasses.replace(s)) == hash(s)
    assert copy.deepcopy(s) == s and copy.deepcopy(s).key == s.key
    assert s.key is not None and s.key.owner == Owner("t", "r")
    c = f.conversation_scope(tenant="t", conversation="c", config="k")
    assert c.key == SessionKey.conversation("t", "c", c.binding_id, c.agent_id, "k")
    assert dataclasses.replace(c, agent_config_snapshot_id="k2").key.config_id == "k2"
    assert c.key.owner == Owner.conversation("t", "c")


def test_session_write_validates_ids_and_record_types() -> None:
    with pytest.raises(InvalidId):
        f.session_write(backend_run_id="")
    with pytest.raises(InvalidId):
        f.session_write(pending_form_id="x" * 256)
    with pytest.raises(InvalidSnapshot):
        SessionWrite(
            snapshot={"layers": []},  # type: ignore[arg-type]
            layer_specs=(),
            app_id="a",
            workflow_id="w",
            node_execution_id="e",
            agent_config_snapshot_id="c",
        )
    with pytest.raises(InvalidSnapshot):
        SessionWrite(
            snapshot=f.snapshot(),
            layer_specs=({"name": "x"},),  # type: ignore[arg-type]
            app_id="a",
            workflow_id="w",
            node_execution_id="e",
            agent_config_snapshot_id="c",
        )


# --- snapshot: the shape is the type's, the values are checked at the door (the codec) ----


def stored(snapshot: Snapshot) -> bytes:
    """What a save does first: encode the snapshot and check it (``InvalidSnapshot``)."""
    return encode_checked(snapshot, 4 << 20)


@pytest.mark.parametrize("state", ["new", "suspended", "closed"])
def test_layer_accepts_the_three_lifecycle_states(state: str) -> None:
    stored(Snapshot((SnapshotLayer("history", LifecycleState(state)),)))
    layer = decode(stored(Snapshot((SnapshotLayer("history", LifecycleState(state)),))))
    assert layer.layers[0].lifecycle_state is LifecycleState(state)


@pytest.mark.parametrize("state", ["active", "", "SUSPENDED", None, 1, {}])
def test_layer_rejects_other_lifecycle_states(state: Any) -> None:
    with pytest.raises(InvalidSnapshot, match="lifecycle_state"):
        stored(Snapshot((SnapshotLayer("history", state),)))


@pytest.mark.parametrize("name", ["", None, 3, "a\x00b"])
def test_layer_needs_a_non_empty_storable_string_name(name: Any) -> None:
    with pytest.raises(InvalidSnapshot):
        stored(Snapshot((SnapshotLayer(name, LifecycleState.NEW),)))


@pytest.mark.parametrize("runtime_state", [[], "text", None, {1: "int key"}])
def test_layer_runtime_state_must_be_an_object_with_string_keys(runtime_state: Any) -> None:
    with pytest.raises(InvalidSnapshot, match="runtime_state"):
        stored(Snapshot((SnapshotLayer("history", LifecycleState.NEW, runtime_state),)))


@pytest.mark.parametrize(
    "runtime_state",
    [
        {"nested": {1: "int key inside"}},
        {"value": {1, 2}},
        {"value": object()},
        {"value": (1, 2)},
        {"value": b"bytes"},
    ],
    ids=["nested-int-key", "set", "object", "tuple", "bytes"],
)
def test_layer_runtime_state_must_be_json_all_the_way_down(runtime_state: Any) -> None:
    """A value that is not JSON would be saved but could never be decoded again (bug 1)."""
    with pytest.raises(InvalidSnapshot):
        stored(Snapshot((SnapshotLayer("history", LifecycleState.NEW, runtime_state),)))


def test_an_integer_beyond_64_bits_is_stored_as_json_holds_it() -> None:
    """The stored form is JSON text, which holds any integer (so does the backend's JSON)."""
    snapshot = Snapshot((SnapshotLayer("history", LifecycleState.NEW, {"n": 2**70}),))
    assert decode(stored(snapshot)).layers[0].runtime_state == {"n": 2**70}


def test_snapshot_rejects_duplicate_layer_names() -> None:
    with pytest.raises(InvalidSnapshot, match="unique"):
        stored(f.snapshot("history", "memory", "history"))


@pytest.mark.parametrize("version", [0, -1, True, "1", 1.0])
def test_snapshot_schema_version_must_be_a_positive_int(version: Any) -> None:
    with pytest.raises(InvalidSnapshot, match="schema_version"):
        stored(Snapshot(layers=(), schema_version=version))


def test_snapshot_from_dict_round_trips() -> None:
    snap = f.snapshot("a", "b", state={"k": [1, 2.5, None, "é"]})
    assert Snapshot.from_dict(snap.to_dict()) == snap
    assert Snapshot.from_dict({"layers": []}) == Snapshot(layers=())


@pytest.mark.parametrize(
    "data",
    [
        {"layers": [], "extra": 1},
        {"layers": [{"name": "a", "lifecycle_state": "new", "colour": "red"}]},
        {"layers": {"a": {}}},
        {"layers": ["a"]},
        {"layers": [{"lifecycle_state": "new"}]},
        {"layers": [{"name": "a"}]},
        ["not", "an", "object"],
        {1: "x"},
        {},
    ],
    ids=[
        "unknown-snapshot-field",
        "unknown-layer-field",
        "layers-not-a-list",
        "layer-not-an-object",
        "layer-without-name",
        "layer-without-state",
        "snapshot-not-an-object",
        "non-string-key",
        "no-layers",
    ],
)
def test_snapshot_from_dict_rejects_malformed_input(data: Any) -> None:
    with pytest.raises(InvalidSnapshot):
        Snapshot.from_dict(data)


def test_layer_spec_round_trips_through_dicts() -> None:
    specs = f.specs("a", "b", "c")
    assert specs_from_list([s.to_dict() for s in specs]) == specs


@pytest.mark.parametrize(
    "data",
    [
        {"name": "a", "type": "t", "secret": "x"},
        {"name": "a"},
        {"name": "a", "type": "t", "deps": {"x": 1}},
        {"name": "a", "type": "t", "deps": ["x"]},
        {"name": "a", "type": "t", "metadata": []},
        "a",
    ],
    ids=[
        "unknown-field",
        "missing-type",
        "dep-not-a-name",
        "deps-not-an-object",
        "metadata-not-an-object",
        "not-an-object",
    ],
)
def test_layer_spec_from_dict_rejects_malformed_input(data: Any) -> None:
    with pytest.raises(InvalidSnapshot):
        LayerSpec.from_dict(data)


def test_specs_from_list_needs_a_list() -> None:
    with pytest.raises(InvalidSnapshot):
        specs_from_list({"name": "a", "type": "t"})


def test_stored_session_dirty_means_version_ahead_of_flushed() -> None:
    key = f.session_key()
    assert f.stored_session(key, version=3, flushed_version=2).dirty
    assert not f.stored_session(key, version=3).dirty
    assert f.stored_session(key, status=SessionStatus.CLEANED).status is SessionStatus.CLEANED


@pytest.mark.parametrize(
    "spec",
    [
        LayerSpec("", "t"),
        LayerSpec("a", ""),
        LayerSpec("a", "t", deps={"x": ""}),
        LayerSpec("a", "t", config={"t": "nul\x00"}),
        LayerSpec("a", "t", metadata={"f": float("inf")}),
    ],
    ids=["empty-name", "empty-type", "dep-not-a-name", "nul", "inf"],
)
def test_layer_specs_are_checked_at_the_door(spec: LayerSpec) -> None:
    with pytest.raises(InvalidSnapshot):
        check_specs([spec])


@pytest.mark.parametrize("bad", ["", "a\x00b", "x" * 256, "lone \ud800"])
def test_a_refused_id_is_refused_every_time_and_never_remembered(bad: str) -> None:
    for _ in range(2):
        with pytest.raises(InvalidId):
            validate.check_id("node_id", bad)
    assert bad not in validate._VALID_IDS


def test_the_memory_of_usable_ids_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate, "_VALID_IDS", {})
    monkeypatch.setattr(validate, "_VALID_IDS_MAX", 3)
    for i in range(10):
        assert validate.check_id("node_id", f"node-{i}") == f"node-{i}"
        assert len(validate._VALID_IDS) <= 3
