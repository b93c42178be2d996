"""The codec: exact round trips, size limits and CorruptValue for anything foreign."""

from __future__ import annotations

import pytest

from cache.codec import Codec, pack
from cache.errors import CorruptValue, PayloadTooLarge
from cache.records import (
    ClosedBy,
    LayerSpec,
    LifecycleState,
    SessionStatus,
    Snapshot,
    SnapshotLayer,
    StoredSession,
)
from cache.snapshot_json import encode_checked
from tests import factories as f

NAME = "asc:{s000}:session:t:r:n:b:g"
KEY = f.session_key(tenant="t", run="r", node="n", binding="b", agent="g")

RICH_SNAPSHOT = Snapshot(
    layers=(
        SnapshotLayer(
            "history",
            LifecycleState.SUSPENDED,
            {
                "messages": [
                    {"role": "user", "content": "héllo 🙂 日本語", "n": 1},
                    {"role": "model", "parts": [{"kind": "text", "text": ""}], "ok": True},
                ],
                "nested": {"a": {"b": {"c": [[], {}, [None, False, 0, -1]]}}},
                "floats": [0.1, 1e-300, 1.7976931348623157e308, -0.0, 3.141592653589793],
                "ints": [0, -(2**63), 2**64 - 1],
                "empty": "",
            },
        ),
        SnapshotLayer("empty-layer", LifecycleState.NEW, {}),
        SnapshotLayer("closed", LifecycleState.CLOSED),
    ),
    schema_version=3,
)
RICH_SPECS = (
    LayerSpec(
        "history",
        "pydantic_ai.history",
        {},
        {"label": "é", "weights": [0.5, 0.25]},
        {"max": 10, "nested": {"x": [1, "two", 3.0, None]}},
    ),
    LayerSpec("memory", "memory.kv", {"history": "history"}, {}, None),
    LayerSpec("cfg-list", "x.y", {}, {}, [1, [2, [3]]]),
)


def _raw(fields: list[bytes | str]) -> dict[bytes, bytes]:
    """Simulate HSET of the pairs (empty value = no field) and HGETALL."""
    out: dict[bytes, bytes] = {}
    for name, value in zip(fields[::2], fields[1::2], strict=True):
        n = name if isinstance(name, bytes) else name.encode()
        v = value if isinstance(value, bytes) else value.encode()
        if v:
            out[n] = v
    return out


def _stored_raw(**overrides: bytes | None) -> dict[bytes, bytes]:
    raw = _raw(Codec().stored_fields(f.stored_session(KEY, version=4, flushed_version=2)))
    for name, value in overrides.items():
        if value is None:
            raw.pop(name.encode(), None)
        else:
            raw[name.encode()] = value
    return raw


def test_snapshot_and_specs_round_trip_exactly() -> None:
    codec = Codec()
    write = f.session_write(RICH_SNAPSHOT, RICH_SPECS, pending_form_id="form-é")
    raw = _raw(codec.write_fields(write)) | {b"status": b"active", b"version": b"7"}
    stored = codec.decode_session(NAME, KEY, raw)
    assert stored.data == write
    assert stored.snapshot.to_dict() == RICH_SNAPSHOT.to_dict()
    # exact floats and types, not just equal-looking values
    floats = stored.snapshot.layers[0].runtime_state["floats"]
    sent = RICH_SNAPSHOT.layers[0].runtime_state["floats"]
    assert [x.hex() for x in floats] == [x.hex() for x in sent]
    assert all(type(x) is float for x in floats)
    assert stored.snapshot.layer_names() == ("history", "empty-layer", "closed")
    assert stored.layer_specs == RICH_SPECS
    assert (stored.status, stored.version, stored.flushed_version) == (
        SessionStatus.ACTIVE,
        7,
        0,
    )


def test_empty_snapshot_and_specs_round_trip() -> None:
    codec = Codec()
    write = f.session_write(Snapshot(layers=()), ())
    stored = codec.decode_session(NAME, KEY, _raw(codec.write_fields(write)) | _state())
    assert stored.snapshot == Snapshot(layers=())
    assert stored.layer_specs == ()


def _state() -> dict[bytes, bytes]:
    return {b"status": b"active", b"version": b"1"}


def test_stored_fields_round_trip_every_state_field() -> None:
    codec = Codec()
    session = StoredSession(
        key=KEY,
        status=SessionStatus.CLEANED,
        version=9,
        flushed_version=8,
        data=f.session_write(RICH_SNAPSHOT, RICH_SPECS, pending_tool_call_id="call-1"),
        created_at="2024-01-01T00:00:00.000+00:00",
        updated_at="2024-01-02T00:00:00.000+00:00",
        cleaned_at="2024-01-03T00:00:00.000+00:00",
        closed_by=ClosedBy.WORKFLOW_END,
        cleanup_error="backend said no: é",
    )
    assert codec.decode_session(NAME, KEY, _raw(codec.stored_fields(session))) == session


def test_optional_fields_left_empty_are_none_after_decoding() -> None:
    codec = Codec()
    write = f.session_write(backend_run_id=None)
    pairs = codec.write_fields(write)
    assert pairs[pairs.index("backend_run_id") + 1] == ""  # empty = the script deletes it
    stored = codec.decode_session(NAME, KEY, _raw(pairs) | _state())
    assert stored.data.backend_run_id is None
    assert stored.data.pending_form_id is None
    assert stored.closed_by is None


@pytest.mark.parametrize("what", ["snapshot", "layer_specs"])
def test_payload_limit_is_inclusive_and_refuses_one_byte_more(what: str) -> None:
    if what == "snapshot":
        snap, specs = f.snapshot_of_size(5000), f.specs()
        size = len(encode_checked(snap, 1 << 20))
        at, over = Codec(max_snapshot_bytes=size), Codec(max_snapshot_bytes=size - 1)
    else:
        snap = f.snapshot()
        specs = tuple(LayerSpec(f"l{i}", "t", {}, {"pad": "y" * 100}) for i in range(50))
        size = len(pack([s.to_dict() for s in specs]))
        at, over = Codec(max_specs_bytes=size), Codec(max_specs_bytes=size - 1)
    write = f.session_write(snap, specs)
    assert at.write_fields(write)  # exactly at the limit: accepted
    with pytest.raises(PayloadTooLarge, match=what):
        over.write_fields(write)


def test_snapshot_of_size_factory_is_close_to_the_requested_size() -> None:
    size = len(encode_checked(f.snapshot_of_size(100_000), 1 << 20))
    assert 100_000 < size < 100_200


# --- corrupt values ------------------------------------------------------------------


def _garbage_snapshots() -> dict[str, bytes]:
    good = pack(f.snapshot().to_dict())
    return {
        "never-used-byte": b"\xc1garbage",
        "truncated": good[:-3],
        "trailing-bytes": good + b"\x00",
        "empty": b"",
        "an-int": pack(42),
        "a-list": pack([1, 2]),
        "unknown-field": pack({"layers": [], "colour": 1}),
        "bad-lifecycle": pack({"layers": [{"name": "a", "lifecycle_state": "active"}]}),
        "int-map-key": pack({1: 2}),
        "truncated-json": b'{"layers": [',
        "json-trailing": b'{"layers": []} x',
        "json-unknown-field": b'{"layers": [], "colour": 1}',
        "json-state-not-text": b'{"layers": [{"name": "a", "lifecycle_state": "new", "x": 1}]}',
    }


@pytest.mark.parametrize("case", list(_garbage_snapshots()))
def test_corrupt_snapshot_raises_corrupt_value_naming_key_and_field(case: str) -> None:
    raw = _stored_raw(snapshot=_garbage_snapshots()[case])
    with pytest.raises(CorruptValue) as info:
        Codec().decode_session(NAME, KEY, raw)
    assert (info.value.key, info.value.field) == (NAME, "snapshot")
    assert NAME in str(info.value)


@pytest.mark.parametrize(
    "value",
    [b"\xc1", pack({"name": "a"}), pack([{"name": "a", "type": "t", "secret": 1}]), pack(["x"])],
    ids=["garbage", "not-a-list", "unknown-field", "item-not-an-object"],
)
def test_corrupt_layer_specs_raise_corrupt_value(value: bytes) -> None:
    with pytest.raises(CorruptValue) as info:
        Codec().decode_session(NAME, KEY, _stored_raw(layer_specs=value))
    assert (info.value.key, info.value.field) == (NAME, "layer_specs")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("app_id", b"\xff\xfe"),
        ("backend_run_id", b"caf\xe9"),
        ("created_at", b"\x80"),
        ("status", b"\xff"),
        ("version", b"seven"),
        ("version", b"1.5"),
        ("flushed_version", b"x"),
        ("status", b"resumable"),
        ("closed_by", b"gravity"),
        ("app_id", None),
        ("workflow_id", None),
        ("node_execution_id", None),
        ("agent_config_snapshot_id", None),
        ("status", None),
        ("version", None),
        ("snapshot", None),
        ("layer_specs", None),
    ],
)
def test_bad_or_missing_field_raises_corrupt_value_naming_it(
    field: str, value: bytes | None
) -> None:
    raw = _stored_raw(**{field: value})
    with pytest.raises(CorruptValue) as info:
        Codec().decode_session(NAME, KEY, raw)
    assert (info.value.key, info.value.field) == (NAME, field)


def test_fields_the_record_does_not_hold_are_not_read() -> None:
    """Cleanup bookkeeping, or a field a newer build writes, never breaks a load."""
    raw = _stored_raw(cleanup_run_id=b"\xff\xfe", future_field=b"\x80")
    stored = Codec().decode_session(NAME, KEY, raw)
    assert stored.version == 4 and stored.flushed_version == 2


def test_a_decoded_session_keeps_the_stored_snapshot_bytes_for_postgres() -> None:
    """The flush writes the stored bytes to Postgres unchanged; the record is decoded too."""
    codec = Codec()
    write = f.session_write(f.snapshot("prompt", "history", state={"n": [1, 2.5, "x"]}))
    fields = codec.write_fields(write)
    raw = {
        (k if isinstance(k, bytes) else k.encode()): (v if isinstance(v, bytes) else v.encode())
        for k, v in zip(fields[::2], fields[1::2], strict=True)
        if v != ""
    }
    raw |= {b"status": b"active", b"version": b"1"}
    stored = codec.decode_session("k", f.session_key(), raw)
    assert stored.snapshot_raw == raw[b"snapshot"]
    assert stored.snapshot == write.snapshot
    assert stored.snapshot.layer_names() == ("prompt", "history")


@pytest.mark.parametrize("bad", [b"\xc1 not msgpack", b"\x91\x01", b"\x81\xa1a\x01\x00"])
def test_malformed_or_foreign_snapshot_bytes_are_a_corrupt_value(bad: bytes) -> None:
    """Corrupt, non-map or trailing-garbage bytes raise CorruptValue naming the field."""
    codec = Codec()
    fields = codec.write_fields(f.session_write())
    raw = {
        (k if isinstance(k, bytes) else k.encode()): (v if isinstance(v, bytes) else v.encode())
        for k, v in zip(fields[::2], fields[1::2], strict=True)
        if v != ""
    }
    raw |= {b"status": b"active", b"version": b"1", b"snapshot": bad}
    with pytest.raises(CorruptValue, match="snapshot"):
        codec.decode_session("k", f.session_key(), raw)


def test_a_legacy_msgpack_snapshot_at_the_limit_fills_redis_as_json() -> None:
    """A row an earlier build stored as msgpack passed the door then; its JSON can be larger
    (control characters become escapes), and a fill writes it without bounding it again."""
    import dataclasses

    from cache.snapshot_json import frame_of, is_json

    legacy = pack(f.snapshot("history", state={"bytes": "\x01" * 2000}))
    stored = dataclasses.replace(
        f.stored_session(KEY),
        data=dataclasses.replace(f.session_write(), snapshot=frame_of(legacy)),
        snapshot_raw=legacy,
    )
    fields = _raw(Codec(max_snapshot_bytes=len(legacy)).stored_fields(stored))
    assert is_json(fields[b"snapshot"]) and len(fields[b"snapshot"]) > len(legacy)
    assert Codec().decode_session(NAME, KEY, fields).snapshot == frame_of(legacy)
