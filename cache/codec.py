"""The one place that turns records into Redis hash fields and back (DESIGN §3), and the door
where a snapshot or a spec list is checked before it is stored.

Every field is plain text except ``snapshot``, the snapshot's JSON text
(:mod:`cache.snapshot_json`; an earlier build's msgpack is still read), and ``layer_specs``,
msgpack bytes (msgspec, encoded and decoded in C against the record types). Encoding enforces
the input contract (:mod:`cache.validate`) and the size limits, so a bad or oversized snapshot
is refused before any I/O; decoding trusts what this library wrote, checks the shape in C
(a snapshot's states stay text), and raises :class:`CorruptValue` naming the key and field of
anything foreign.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgspec

from cache.errors import CorruptValue, InvalidSnapshot, PayloadTooLarge
from cache.records import (
    ClosedBy,
    LayerSpec,
    OwnerType,
    SessionKey,
    SessionStatus,
    SessionWrite,
    StoredSession,
    unchecked,
)
from cache.snapshot_json import encode_checked, frame_of, stored_text
from cache.validate import check_json, check_json_object, check_name

SNAPSHOT = "snapshot"
LAYER_SPECS = "layer_specs"
WRITE_TEXT_FIELDS = (
    "app_id",
    "workflow_id",
    "node_execution_id",
    "agent_config_snapshot_id",
    "backend_run_id",
    "pending_form_id",
    "pending_tool_call_id",
)
WRITE_FIELDS = (SNAPSHOT, LAYER_SPECS, *WRITE_TEXT_FIELDS)
"""What a save writes, in ``lua/save.lua``'s ``FIELDS`` order."""
REQUIRED_ID_FIELDS = ("app_id", "agent_config_snapshot_id")
OPTIONAL_ID_FIELDS = tuple(name for name in WRITE_TEXT_FIELDS if name not in REQUIRED_ID_FIELDS)
WORKFLOW_ID_FIELDS = ("workflow_id", "node_execution_id")
"""Required of a workflow run's session; a conversation's has none."""
STATE_TEXT_FIELDS = (
    "created_at",
    "updated_at",
    "cleaned_at",
    "cleanup_error",
    "lineage",
    "content_id",
)
_CHECKED_SPECS_KEPT: Final = 256

E = TypeVar("E", SessionStatus, ClosedBy)

_ENCODER: Final = msgspec.msgpack.Encoder()
_JSON_ENCODER: Final = msgspec.json.Encoder()
_SPECS_DECODER: Final = msgspec.msgpack.Decoder(tuple[LayerSpec, ...])


def pack(value: Any) -> bytes:
    """msgpack of any JSON-like value (what the stored fields are made of)."""
    return _ENCODER.encode(value)


def encode(what: str, value: object) -> bytes:
    """msgpack of ``value``; :class:`InvalidSnapshot` for what msgpack cannot hold (an integer
    beyond 64 bits, a lone surrogate, nesting past the interpreter's recursion limit)."""
    try:
        return _ENCODER.encode(value)
    except (OverflowError, UnicodeEncodeError, RecursionError, TypeError) as exc:
        raise InvalidSnapshot(f"{what} cannot be stored: {exc}") from None


def encode_specs_json(specs: Sequence[LayerSpec]) -> str:
    """The JSON text of a spec list (Postgres' ``layer_specs`` column)."""
    return _JSON_ENCODER.encode(tuple(specs)).decode()


def specs_json_of(data: bytes) -> str:
    """The JSON text of stored spec-list msgpack (its shape checked in C on the way)."""
    return encode_specs_json(_SPECS_DECODER.decode(data))


# --- the door (snapshots: cache.snapshot_json.encode_checked) --------------------------


def check_specs(specs: Sequence[object]) -> None:
    """Refuse layer specs that could not reach Postgres (JSON text, no NUL) and the backend."""
    for spec in specs:
        if type(spec) is not LayerSpec:
            raise InvalidSnapshot(f"layer specs must be LayerSpec records, got {spec!r}")
        check_name("layer spec name", spec.name)
        check_name(f"layer spec {spec.name!r} type", spec.type)
        deps = check_json_object(f"layer spec {spec.name!r} deps", spec.deps, nul_ok=False)
        for name, target in deps.items():
            check_name(f"layer spec {spec.name!r} deps[{name!r}]", target)
        check_json_object(f"layer spec {spec.name!r} metadata", spec.metadata, nul_ok=False)
        check_json(f"layer spec {spec.name!r} config", spec.config, nul_ok=False)


class _CheckedSpecs:
    """The encodings of spec lists already checked: a loop saves the same specs every time."""

    def __init__(self) -> None:
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()  # an eviction between a hit and its move_to_end

    def check(self, specs: Sequence[LayerSpec], encoded: bytes) -> None:
        with self._lock:
            if encoded in self._seen:
                self._seen.move_to_end(encoded)
                return
        check_specs(specs)
        with self._lock:
            self._seen[encoded] = None
            if len(self._seen) > _CHECKED_SPECS_KEPT:
                self._seen.popitem(last=False)


_CHECKED_SPECS: Final = _CheckedSpecs()


def check_specs_once(specs: Sequence[LayerSpec]) -> bytes:
    """:func:`check_specs`, skipped for a spec list checked before (a loop sends the same
    composition every time); the list's msgpack encoding."""
    data = encode("layer_specs", tuple(specs))
    _CHECKED_SPECS.check(specs, data)
    return data


@dataclass(frozen=True, slots=True)
class Codec:
    """Encodes and decodes session hashes within the configured size limits."""

    max_snapshot_bytes: int = 4 * 1024 * 1024
    max_specs_bytes: int = 1024 * 1024

    def encode_specs(self, specs: Sequence[LayerSpec]) -> bytes:
        return self._bounded("layer_specs", check_specs_once(specs), self.max_specs_bytes)

    @staticmethod
    def _bounded(what: str, data: bytes, limit: int) -> bytes:
        if len(data) > limit:
            raise PayloadTooLarge(f"encoded {what} is {len(data)} bytes; the limit is {limit}")
        return data

    def write_values(self, write: SessionWrite) -> list[bytes | str]:
        """The values of :data:`WRITE_FIELDS`, in that order (``save``'s ``ARGV``; the script
        knows the names); an empty value deletes the field."""
        snapshot = encode_checked(write.snapshot, self.max_snapshot_bytes)
        return self._values(snapshot, write)

    def _values(self, snapshot: bytes, write: SessionWrite) -> list[bytes | str]:
        specs = self.encode_specs(write.layer_specs)
        return [snapshot, specs, *(getattr(write, name) or "" for name in WRITE_TEXT_FIELDS)]

    def write_fields(self, write: SessionWrite) -> list[bytes | str]:
        """Flat ``field, value, ...`` pairs of a write; an empty value deletes the field."""
        return _pairs(WRITE_FIELDS, self.write_values(write))

    def stored_fields(self, session: StoredSession) -> list[bytes | str]:
        """All fields of a stored session (for ``fill``), as flat pairs. Its snapshot passed
        the door when it was saved: its text is written as it is (an earlier build's msgpack
        as JSON), not checked or bounded again."""
        snapshot = stored_text(session.data.snapshot, session.snapshot_raw)
        pairs = _pairs(WRITE_FIELDS, self._values(snapshot, session.data))
        pairs += ["status", session.status.value, "version", str(session.version)]
        pairs += ["flushed_version", str(session.flushed_version)]
        pairs += ["flushing_version", str(session.flushed_version)]
        pairs += ["closed_by", session.closed_by.value if session.closed_by else ""]
        for name in STATE_TEXT_FIELDS:
            pairs += [name, getattr(session, name) or ""]
        return pairs

    def decode_session(
        self, name: str, key: SessionKey, raw: Mapping[bytes, bytes]
    ) -> StoredSession:
        """Build a :class:`StoredSession` from an ``HGETALL`` reply of key ``name``.

        What this library wrote is trusted: the shape is checked (in C for the snapshot and
        specs), IDs are not validated again. Anything foreign is a :class:`CorruptValue`.
        """
        fields = _Fields(name, raw)
        snapshot_raw = fields.binary(SNAPSHOT)
        text = fields.texts.get
        write = unchecked(
            SessionWrite,
            snapshot=fields.decoded(SNAPSHOT, snapshot_raw, frame_of),
            layer_specs=fields.decoded(
                LAYER_SPECS, fields.binary(LAYER_SPECS), _SPECS_DECODER.decode
            ),
            **{f: fields.required(f) for f in REQUIRED_ID_FIELDS},
            **{f: text(f) for f in OPTIONAL_ID_FIELDS},
        )
        if key.owner_type is OwnerType.WORKFLOW_RUN:
            for field in WORKFLOW_ID_FIELDS:
                fields.required(field)
        return StoredSession(
            key=key,
            status=fields.enum("status", SessionStatus),
            version=fields.integer("version"),
            flushed_version=fields.integer("flushed_version", default=0),
            data=write,
            created_at=text("created_at"),
            updated_at=text("updated_at"),
            cleaned_at=text("cleaned_at"),
            closed_by=fields.enum("closed_by", ClosedBy) if text("closed_by") else None,
            cleanup_error=text("cleanup_error"),
            lineage=text("lineage"),
            content_id=text("content_id"),
            snapshot_raw=snapshot_raw,
        )


_TEXT_FIELDS: Final = tuple(
    (name, name.encode())
    for name in (
        *WRITE_TEXT_FIELDS,
        *STATE_TEXT_FIELDS,
        "status",
        "version",
        "flushed_version",
        "closed_by",
    )
)
"""The text fields a session record is built from, as ``(name, bytes name)``."""


class _Fields:
    """Typed access to one hash reply, raising :class:`CorruptValue` for the field at fault.

    The text fields of a record are decoded up front, in one pass (a reply holds a dozen);
    fields the record does not hold (cleanup bookkeeping, anything newer) are not read."""

    __slots__ = ("name", "raw", "texts")

    def __init__(self, name: str, raw: Mapping[bytes, bytes]) -> None:
        self.name = name
        self.raw = raw
        get = raw.get
        try:
            self.texts = {
                field: value.decode()
                for field, key in _TEXT_FIELDS
                if (value := get(key)) is not None
            }
        except UnicodeDecodeError as exc:
            field = next(f for f, key in _TEXT_FIELDS if not _utf8(get(key) or b""))
            raise self._fail(field, "not UTF-8 text") from exc

    def _fail(self, field: str, reason: str) -> CorruptValue:
        return CorruptValue(self.name, field, reason)

    def required(self, field: str) -> str:
        value = self.texts.get(field)
        if not value:
            raise self._fail(field, "missing")
        return value

    def integer(self, field: str, default: int | None = None) -> int:
        value = self.texts.get(field)
        if value is None and default is not None:
            return default
        try:
            return int(value or "")
        except ValueError as exc:
            raise self._fail(field, f"not an integer: {value!r}") from exc

    def enum(self, field: str, kind: type[E]) -> E:
        value = self.required(field)
        try:
            return kind(value)
        except ValueError as exc:
            raise self._fail(field, f"unknown {kind.__name__}: {value!r}") from exc

    def binary(self, field: str) -> bytes:
        value = self.raw.get(field.encode())
        if value is None:
            raise self._fail(field, "missing")
        return value

    def decoded(self, field: str, value: bytes, decode: Callable[[bytes], Any]) -> Any:
        try:
            return decode(value)
        except (msgspec.DecodeError, ValueError) as exc:
            raise self._fail(field, f"not a stored {field}: {exc}") from exc


def _utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def _pairs(names: Sequence[str], values: Sequence[bytes | str]) -> list[bytes | str]:
    """Flat ``name, value, ...`` pairs."""
    return [item for pair in zip(names, values, strict=True) for item in pair]
