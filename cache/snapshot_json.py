"""Snapshots as JSON text: how they are stored (Redis, Postgres) and sent (the backend).

A snapshot is stored as the JSON the backend speaks, so it travels between the backend, Redis
and Postgres without being decoded into Python objects and encoded again. A snapshot read
from JSON (a backend's answer, a Redis hash, a Postgres row) is a :class:`RawSnapshot`: its
layers are :class:`RawLayer`\\ s, whose ``runtime_state`` is that layer's JSON text
(``msgspec.Raw``), decoded only when someone asks (:func:`decoded`). Encoding one writes that
text as it is.

The door (:func:`encode_checked`) is the same for every snapshot: the frame (record types,
names, lifecycle states) is checked in Python; a layer state built in Python is checked value
by value (:func:`cache.validate.check_json_object`); a layer state held as text is checked as
text, on its own (:func:`check_state_text`): one JSON object that every reader decodes
(simdjson's validating parser, msgspec's full decode for what simdjson refuses), nested at
most :data:`~cache.validate.MAX_JSON_DEPTH` deep (:func:`nesting_within`). No flag says where
a snapshot came from: a runtime state is either JSON text, checked as text, or Python values,
checked as values.

Snapshots that earlier builds stored as msgpack are still read (:func:`frame_of`).
"""

from __future__ import annotations

import re
from typing import Final

import msgspec
import simdjson

from cache.errors import InvalidSnapshot, PayloadTooLarge
from cache.records import LifecycleState, Snapshot, SnapshotLayer, is_text
from cache.validate import MAX_JSON_DEPTH, check_json_object, check_name

EMPTY_STATE: Final = msgspec.Raw(b"{}")


class RawLayer(SnapshotLayer, frozen=True):
    """A layer read from JSON: its runtime state is still that JSON's text."""

    runtime_state: msgspec.Raw = EMPTY_STATE  # type: ignore[assignment]


class RawSnapshot(Snapshot, frozen=True):
    """A snapshot read from JSON, each layer's runtime state still text (:class:`RawLayer`)."""

    layers: tuple[RawLayer, ...]


_ENCODER: Final = msgspec.json.Encoder()
_RAW: Final = msgspec.json.Decoder(RawSnapshot)
_FULL: Final = msgspec.json.Decoder(Snapshot)
_LEGACY: Final = msgspec.msgpack.Decoder(Snapshot)
_SYNTAX: Final = msgspec.json.Decoder(msgspec.Raw)
_LEGACY_SYNTAX: Final = msgspec.msgpack.Decoder(msgspec.Raw)
_ANY: Final = msgspec.json.Decoder()
_STATES: Final = frozenset(LifecycleState)
_BRACKETS: Final = bytes.maketrans(b"{}", b"[]")
_DROP: Final = bytes(b for b in range(256) if b not in b'"[]{}')
"""Every byte but quotes and brackets."""
_WHITESPACE: Final = b" \t\r\n"
_ESCAPE: Final = re.compile(rb"\\.", re.DOTALL)
"""A backslash escape in JSON text and the character it escapes."""


def is_json(data: bytes) -> bool:
    """Whether stored snapshot bytes are JSON (an object) rather than an earlier build's
    msgpack (a map: never a byte that opens a JSON document)."""
    return data.lstrip(_WHITESPACE)[:1] == b"{"


def frame_of(data: bytes) -> RawSnapshot:
    """The raw frame of stored snapshot bytes (shape checked in C, states left as text);
    ``msgspec.DecodeError`` if they are not a snapshot."""
    if is_json(data):
        return _RAW.decode(data)
    return to_raw(_LEGACY.decode(data))


def decode(data: bytes) -> Snapshot:
    """Stored snapshot bytes as plain Python values (for inspection, not the hot path)."""
    return _FULL.decode(data) if is_json(data) else _LEGACY.decode(data)


def decoded(snapshot: Snapshot) -> Snapshot:
    """``snapshot`` with every runtime state as Python values (itself if it has no text)."""
    if any(is_text(layer.runtime_state) for layer in snapshot.layers):
        return _FULL.decode(_ENCODER.encode(snapshot))
    return snapshot


def text_of(snapshot: Snapshot) -> bytes:
    """The JSON of a snapshot already checked (a stored record's), not checked again."""
    return _ENCODER.encode(snapshot)


def stored_text(snapshot: Snapshot, stored: bytes | None) -> bytes:
    """The JSON of a snapshot already checked (a stored record's, with the bytes it was read
    from, if any): those bytes when they are JSON, else its encoding (an earlier build's
    msgpack becomes JSON); never checked again, so no limit refuses what was once accepted."""
    if stored is not None and is_json(stored):
        return stored
    return _ENCODER.encode(snapshot)


def check_stored(data: bytes) -> None:
    """``msgspec.DecodeError`` unless ``data`` is one JSON document (or, from an earlier
    build, one msgpack value): what the flush checks before it writes a hash's bytes."""
    if is_json(data):
        _SYNTAX.decode(data)
    else:
        _LEGACY_SYNTAX.decode(data)


def to_raw(snapshot: Snapshot) -> RawSnapshot:
    """``snapshot`` with every runtime state as JSON text (no check: for trusted values)."""
    if type(snapshot) is RawSnapshot:
        return snapshot
    return _RAW.decode(_ENCODER.encode(snapshot))


def encode_checked(snapshot: object, limit: int) -> bytes:
    """The JSON of ``snapshot`` if it can land everywhere unchanged (at most ``limit`` bytes);
    :class:`InvalidSnapshot` or :class:`PayloadTooLarge` otherwise. See the module docstring."""
    checked = _check_frame(snapshot)
    try:
        data = _ENCODER.encode(checked)
    except (OverflowError, UnicodeEncodeError, RecursionError, TypeError, ValueError) as exc:
        raise InvalidSnapshot(f"snapshot cannot be stored: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"encoded snapshot is {len(data)} bytes; the limit is {limit}")
    _check_text(checked)
    return data


def _check_frame(snapshot: object) -> Snapshot:
    """Everything but the text: the record types, the names, Python-built states."""
    if not isinstance(snapshot, Snapshot):
        raise InvalidSnapshot(f"snapshot must be a Snapshot, got {type(snapshot).__name__}")
    version = snapshot.schema_version
    if type(version) is not int or version < 1:
        raise InvalidSnapshot(f"schema_version must be a positive int: {version!r}")
    if type(snapshot.layers) is not tuple:
        raise InvalidSnapshot("snapshot layers must be a tuple of SnapshotLayer records")
    for layer in snapshot.layers:
        _check_layer(layer)
    names = snapshot.layer_names()
    if len(set(names)) != len(names):
        raise InvalidSnapshot(f"snapshot layer names must be unique: {list(names)}")
    return snapshot


def _check_layer(layer: object) -> None:
    if not isinstance(layer, SnapshotLayer):
        raise InvalidSnapshot(f"snapshot layers must be SnapshotLayer records, got {layer!r}")
    check_name("snapshot layer name", layer.name)
    if not isinstance(layer.lifecycle_state, str) or layer.lifecycle_state not in _STATES:
        raise InvalidSnapshot(
            f"layer {layer.name!r}: lifecycle_state must be one of "
            f"{[s.value for s in LifecycleState]}, got {layer.lifecycle_state!r}"
        )
    if not is_text(layer.runtime_state):
        check_json_object(f"layer {layer.name!r} runtime_state", layer.runtime_state)


def _check_text(checked: Snapshot) -> None:
    """Each state held as text, on its own: one JSON object (nothing of it spills into its
    layer's other fields or the next layer), every value decodable, nesting bounded."""
    for layer in checked.layers:
        state: object = layer.runtime_state
        if type(state) is msgspec.Raw:
            check_state_text(f"layer {layer.name!r} runtime_state", state)


def check_state_text(where: str, text: msgspec.Raw) -> None:
    """:class:`InvalidSnapshot` unless ``text`` is one JSON object that every reader of a
    snapshot decodes (msgspec here, the backend's parser) nested at most
    :data:`~cache.validate.MAX_JSON_DEPTH` deep.

    simdjson validates it in one C pass: the syntax, one document and nothing after it,
    UTF-8, escapes (no lone surrogate), numbers in range. What it refuses, msgspec's full
    decode has the last word on: integers beyond 64 bits are refused by simdjson alone
    (``BIGINT_ERROR``) but decode, and are stored, as before. The nesting needs a pass only
    when the text holds more opening brackets than the bound (one in a string counts too).
    """
    data = bytes(text)
    try:
        is_object: bool | None = type(simdjson.Parser().parse(data)) is simdjson.Object
    except (ValueError, RuntimeError):  # UnicodeDecodeError is a ValueError
        is_object = None  # msgspec decides, once the nesting is known to be bounded
    if more_openings_than(data, MAX_JSON_DEPTH) and not nesting_within(data, MAX_JSON_DEPTH):
        raise InvalidSnapshot(f"{where} nests deeper than {MAX_JSON_DEPTH} levels")
    if is_object is None:
        is_object = _decodes_to_object(where, data)
    if not is_object:
        raise InvalidSnapshot(f"{where} must be a JSON object")


def more_openings_than(data: bytes, limit: int) -> bool:
    """Whether ``data`` holds more than ``limit`` opening brackets, in strings too (their count
    bounds the nesting from above).

    Each count is the length a deletion removes, stopped after ``limit + 1``: ``bytes.replace``
    finds a single byte with ``memchr``, faster here than a ``translate`` pass over every
    byte (about 6 against 10 µs for the six layers of the benchmarks' realistic state), and
    the stop keeps a text of nothing but brackets from costing a ``memchr`` call per byte
    (0.13 ms for 4 MB of them)."""
    removed = 2 * len(data)
    removed -= len(data.replace(b"{", b"", limit + 1)) + len(data.replace(b"[", b"", limit + 1))
    return removed > limit


def _decodes_to_object(where: str, data: bytes) -> bool:
    """Whether msgspec's full decode of ``data`` gives an object; :class:`InvalidSnapshot`
    if it does not decode."""
    try:
        return type(_ANY.decode(data)) is dict
    except msgspec.DecodeError as exc:
        raise InvalidSnapshot(f"{where} is not JSON every reader can decode: {exc}") from None


def nesting_within(data: bytes, limit: int) -> bool:
    """Whether valid JSON ``data`` nests at most ``limit`` containers deep, read off its text
    in C-level passes (no Python step per value).

    Escapes go first (a backslash and the character after it), then everything but quotes
    and brackets. If every run of adjacent quotes is even, no string holds a bracket (the
    first string that did would end a run on its opening quote), so the quotes go too;
    otherwise what lies inside each string goes. What is left is the brackets, and each pass
    removes the innermost pairs.
    """
    if b"\\" in data:
        data = _ESCAPE.sub(b"", data)
    marks = data.translate(_BRACKETS, _DROP)
    if marks.count(b'""') * 2 == marks.count(b'"'):
        outside = marks.translate(None, b'"')
    else:
        outside = b"".join(marks.split(b'"')[::2])
    if len(outside) <= 2 * limit:  # no more containers than the limit
        return True
    for _ in range(limit):
        if not outside:
            return True
        outside = outside.replace(b"[]", b"")
    return not outside
