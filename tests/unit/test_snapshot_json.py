"""Snapshots as JSON text: the nesting read off the text, the door, raw frames."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cache.errors import InvalidSnapshot, PayloadTooLarge
from cache.records import LifecycleState, Snapshot, SnapshotLayer
from cache.snapshot_json import (
    RawLayer,
    RawSnapshot,
    decode,
    encode_checked,
    frame_of,
    more_openings_than,
    nesting_within,
)
from cache.validate import MAX_JSON_DEPTH

TEXT = st.text(alphabet=st.sampled_from('ab"\\[]{}:,é\n\x00'), max_size=6)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=30,
)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


@given(JSON, st.booleans())
def test_the_nesting_read_off_the_text_is_the_values_nesting(value: Any, spaced: bool) -> None:
    """Brackets, quotes and backslashes inside strings do not count; whitespace does not
    matter (the backend's JSON need not be msgspec's)."""
    text = (json.dumps(value, indent=1) if spaced else json.dumps(value)).encode()
    d = depth(value)
    assert nesting_within(text, d)
    assert not d or not nesting_within(text, d - 1)


@given(
    st.binary(max_size=64) | JSON.map(lambda value: json.dumps(value).encode()),
    st.integers(min_value=0, max_value=12),
)
def test_more_openings_than_counts_every_opening_bracket_byte(data: bytes, limit: int) -> None:
    """The bound the door reads before it looks at the nesting: every ``{`` and ``[`` byte,
    in strings too (never below the nesting), exact at the limit whichever bracket hits it."""
    assert more_openings_than(data, limit) == (sum(byte in b"{[" for byte in data) > limit)


def layer(state: object, name: str = "history") -> SnapshotLayer:
    return SnapshotLayer(name, LifecycleState.SUSPENDED, state)  # type: ignore[arg-type]


def nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize("from_json", [False, True], ids=["python", "json-text"])
def test_the_door_bounds_the_nesting_of_python_values_and_of_json_text(from_json: bool) -> None:
    for levels, ok in ((MAX_JSON_DEPTH, True), (MAX_JSON_DEPTH + 1, False)):
        snapshot = Snapshot((layer(nested(levels)),))
        if from_json:
            snapshot = msgspec.json.decode(msgspec.json.encode(snapshot), type=RawSnapshot)
        if ok:
            assert decode(encode_checked(snapshot, 1 << 20)) == snapshot
        else:
            with pytest.raises(InvalidSnapshot, match="nests deeper"):
                encode_checked(snapshot, 1 << 20)


def test_json_text_is_stored_as_the_backend_wrote_it() -> None:
    text = b'{ "schema_version": 1, "layers": [ {"name": "h", "lifecycle_state": "new",\n'
    text += b' "runtime_state": {"n": 12345678901234567890123, "s": "\\u00e9\\ud83d\\ude00"}} ] }'
    snapshot = msgspec.json.decode(text, type=RawSnapshot)
    stored = encode_checked(snapshot, 1 << 20)
    assert b'"runtime_state":{"n": 12345678901234567890123, "s": "\\u00e9' in stored
    assert decode(stored).layers[0].runtime_state["n"] == 12345678901234567890123


@pytest.mark.parametrize(
    "raw",
    [b"[1, 2]", b'"text"', b"{", b'{"a": 1} {"b": 2}', b"NaN"],
    ids=["array", "string", "truncated", "two-documents", "nan"],
)
def test_a_hand_made_text_state_is_checked_as_text(raw: bytes) -> None:
    """A state held as text is trusted for nothing: a JSON object, or refused."""
    snapshot = RawSnapshot((RawLayer("h", LifecycleState.NEW, msgspec.Raw(raw)),))
    with pytest.raises(InvalidSnapshot):
        encode_checked(snapshot, 1 << 20)


def test_a_python_state_swapped_into_a_snapshot_read_from_json_is_checked_as_values() -> None:
    """No flag says where a snapshot came from: a replaced state is values, checked as such."""
    wire = msgspec.json.decode(msgspec.json.encode(Snapshot((layer({"ok": 1}),))), type=RawSnapshot)
    swapped = msgspec.structs.replace(
        wire, layers=(msgspec.structs.replace(wire.layers[0], runtime_state={"x": float("nan")}),)
    )
    with pytest.raises(InvalidSnapshot, match="finite"):
        encode_checked(swapped, 1 << 20)


def test_the_size_limit_counts_the_stored_text() -> None:
    snapshot = Snapshot((layer({"blob": "x" * 1000}),))
    size = len(encode_checked(snapshot, 1 << 20))
    assert len(encode_checked(snapshot, size)) == size
    with pytest.raises(PayloadTooLarge):
        encode_checked(snapshot, size - 1)


def test_a_frame_keeps_states_as_text_and_decodes_to_the_same_snapshot() -> None:
    snapshot = Snapshot((layer({"k": [1, {"z": None}]}), layer({}, "memory")))
    frame = frame_of(encode_checked(snapshot, 1 << 20))
    assert all(type(x.runtime_state) is msgspec.Raw for x in frame.layers)
    assert frame == snapshot and frame.decoded() == snapshot
    assert frame.aligned_to(["memory", "new"]).layer_names() == ("memory", "new")


def wire_snapshot(state: bytes) -> bytes:
    """A backend's answer holding ``state`` as one layer's runtime state."""
    return b'{"layers": [{"name": "h", "lifecycle_state": "new", "runtime_state": ' + state + b"}]}"


@pytest.mark.parametrize(
    "state",
    [
        b'{"a": "\xff\xfe"}',
        b'{"a": "\xc0\xaf"}',
        b'{"a": "\xed\xa0\x80"}',
        b'{"a": "\\ud800x"}',
        b'{"a": "\\udc00"}',
        b'{"a": 2e308}',
        b'{"a": -1E+400}',
        b'{"a": [1, ' + b"9" * 250 + b"e60]}",
        b'{"a": ' + b"1" * 5000 + b"}",
    ],
    ids=[
        "bad-utf8",
        "overlong",
        "encoded-surrogate",
        "lone-high-escape",
        "lone-low-escape",
        "float-overflow",
        "negative-overflow",
        "long-mantissa",
        "5000-digit-int",
    ],
)
def test_a_backends_text_state_that_would_not_decode_later_is_refused(state: bytes) -> None:
    """msgspec reads a raw span's syntax but not its values: the door decodes what could be
    out of range, so nothing stored fails to decode later (a state from the wire or made by
    hand: the same door)."""
    snapshot = RawSnapshot((RawLayer("h", LifecycleState.NEW, msgspec.Raw(state)),))
    with pytest.raises(InvalidSnapshot):
        encode_checked(snapshot, 1 << 20)


@pytest.mark.parametrize(
    "state",
    [
        b'{"pair": "\\ud83d\\ude00", "big": 1.5e307, "e": "e1000", "id": "3e4f0a"}',
        b'{"n": ' + b"9" * 150 + b', "tiny": 1e-9, "x": "\\\\ud800"}',
    ],
    ids=["false-alarms", "in-range"],
)
def test_text_states_that_only_look_risky_are_stored(state: bytes) -> None:
    snapshot = msgspec.json.decode(wire_snapshot(state), type=RawSnapshot)
    stored = encode_checked(snapshot, 1 << 20)
    assert decode(stored).layers[0].runtime_state == msgspec.json.decode(state)


@pytest.mark.parametrize(
    "raw",
    [
        b'{},"name":""',
        b'{},"name":"\\u0000"',
        b'{}},{"name":"a","lifecycle_state":"new","runtime_state":{}',
    ],
    ids=["renames-its-layer", "nul-name", "adds-a-layer"],
)
def test_a_hand_made_text_state_cannot_spill_into_the_frame(raw: bytes) -> None:
    snapshot = RawSnapshot((RawLayer("a", LifecycleState.NEW, msgspec.Raw(raw)),))
    with pytest.raises(InvalidSnapshot):
        encode_checked(snapshot, 1 << 20)


def test_an_int_too_long_for_python_to_print_is_invalid_not_a_crash() -> None:
    with pytest.raises(InvalidSnapshot):
        encode_checked(Snapshot((layer({"n": 10**5000}),)), 1 << 20)


def reader_takes(text: bytes) -> bool:
    """What the door must decide, from the readers' side: msgspec decodes ``text`` in full
    into an object nested at most ``MAX_JSON_DEPTH`` deep."""
    try:
        value = msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return False
    return type(value) is dict and depth(value) <= MAX_JSON_DEPTH


def door_takes(text: bytes) -> bool:
    snapshot = RawSnapshot((RawLayer("h", LifecycleState.NEW, msgspec.Raw(text)),))
    try:
        encode_checked(snapshot, 1 << 20)
    except InvalidSnapshot:
        return False
    return True


NUMBER = st.from_regex(rb"\A-?[0-9]{1,25}(\.[0-9]{1,25})?([eE][+-]?[0-9]{1,5})?\Z")
NOISE = st.sampled_from(
    [b"0", b"9", b"e", b"E", b"+", b"-", b".", b'"', b"\\", b"u", b"d800", b"[", b"]", b"{",
     b"}", b",", b":", b" ", b"\xff", b"\xed\xa0\x80", b"\xc3\xa9", b"\x00", b"null"]
)  # fmt: skip


@given(JSON, st.lists(st.tuples(st.integers(0, 10_000), NOISE), max_size=3), NUMBER)
def test_the_door_takes_a_text_state_exactly_when_every_reader_does(
    value: Any, edits: list[tuple[int, bytes]], number: bytes
) -> None:
    """simdjson is the door's fast path and msgspec the readers' parser: whatever a text state
    holds (mangled JSON, odd numbers, bad UTF-8, lone surrogates), the door stores it exactly
    when msgspec decodes it in full into an object within the nesting bound."""
    text = msgspec.json.encode({"v": value, "n": msgspec.Raw(number)})
    for offset, noise in edits:
        at = offset % (len(text) + 1)
        text = text[:at] + noise + text[at:]
    assert door_takes(text) == reader_takes(text)


@pytest.mark.parametrize(
    "text",
    [b'{"n": 18446744073709551615, "m": -9223372036854775808}', b'{"n": 18446744073709551616}',
     b'{"n": -9223372036854775809}', b'{"f": 1.7976931348623157e308, "g": 5e-324, "h": 1e-400}',
     b'{"f": 1.7976931348623159e308}', b'{"a": ' + b"[" * 99 + b"]" * 99 + b"}",
     b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", b'{"a": "' + b"[" * 200 + b'"}'],
    ids=["64-bit-ends", "past-uint64", "past-int64", "float-ends", "past-float-max",
         "100-deep", "101-deep", "brackets-in-a-string"],
)  # fmt: skip
def test_numbers_at_the_edges_and_deep_text_are_decided_as_the_reader_does(text: bytes) -> None:
    assert door_takes(text) == reader_takes(text)


@pytest.mark.parametrize("size", [100, 70_000], ids=["small", "large"])
def test_small_and_large_texts_are_decided_alike_from_many_threads(size: int) -> None:
    """The door's verdicts are the reader's, whatever runs beside them on other threads."""
    pad = b'"' + b"x" * size + b'"'
    texts = [
        b'{"p": ' + pad + b"}",
        b'{"p": ' + pad + b"} x",
        b'{"p": [' + pad + b"]",
        b'{"a": ' + b"[" * 101 + pad + b"]" * 101 + b"}",
        b'{"a": ' + b"[" * 99 + pad + b"]" * 99 + b"}",
    ]
    expected = [reader_takes(text) for text in texts]
    assert expected == [True, False, False, False, True]
    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(door_takes, texts * 50))
    assert verdicts == expected * 50
