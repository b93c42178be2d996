"""The one place that turns records into Redis hash fields and back (DESIGN §3).

Every field is plain text except ``snapshot`` and ``layer_specs``, which are msgpack bytes.
Encoding enforces the size limits, so an oversized snapshot is refused before any I/O;
decoding raises :class:`CorruptValue` naming the key and field of anything foreign.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from cache.errors import CorruptValue, InvalidId, InvalidSnapshot, PayloadTooLarge
from cache.records import (
    ClosedBy,
    LayerSpec,
    SessionKey,
    SessionStatus,
    SessionWrite,
    Snapshot,
    StoredSession,
    snapshot_from_stored,
    specs_from_stored,
    specs_to_list,
    unchecked,
)
from cache.validate import check_id

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
REQUIRED_ID_FIELDS = WRITE_TEXT_FIELDS[:4]
OPTIONAL_ID_FIELDS = WRITE_TEXT_FIELDS[4:]
STATE_TEXT_FIELDS = ("created_at", "updated_at", "cleaned_at", "cleanup_error", "lineage")

T = TypeVar("T")
E = TypeVar("E", SessionStatus, ClosedBy)


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def _decode_snapshot_bytes(data: bytes) -> Snapshot:
    return snapshot_from_stored(unpack(data))


class EncodedSnapshot(Snapshot):
    """A stored snapshot kept as its msgpack bytes and decoded only if something reads it.

    The flush path reads these and hands ``encoded`` to Postgres unchanged: the bytea column
    holds the same msgpack encoding, so decoding and re-packing an 8 KB snapshot per row
    was pure waste. Equal to a plain :class:`Snapshot` with the same content.
    """

    __slots__ = ("encoded",)
    encoded: bytes

    def __init__(self, encoded: bytes) -> None:
        object.__setattr__(self, "encoded", encoded)

    def __getattr__(self, name: str) -> Any:
        if name not in ("layers", "schema_version"):
            raise AttributeError(name)
        decoded = _decode_snapshot_bytes(self.encoded)
        object.__setattr__(self, "layers", decoded.layers)
        object.__setattr__(self, "schema_version", decoded.schema_version)
        return getattr(self, name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Snapshot):
            return NotImplemented
        return (self.schema_version, self.layers) == (other.schema_version, other.layers)

    __hash__ = None  # type: ignore[assignment]


def _encoded_snapshot(data: bytes) -> EncodedSnapshot:
    """Keep the bytes, but only if they are one well-formed msgpack map (checked in C,
    without building it), so a corrupt value is parked instead of reaching Postgres."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    try:
        unpacker.skip()
    except Exception as exc:  # msgpack's errors do not share one base class
        raise ValueError(f"malformed msgpack: {type(exc).__name__}") from exc
    if not data or data[0] not in _MAP_MARKERS or unpacker.tell() != len(data):
        raise ValueError("not exactly one msgpack map")
    return EncodedSnapshot(data)


_MAP_MARKERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


def snapshot_bytes(snapshot: Snapshot) -> bytes:
    """The msgpack encoding of ``snapshot``: the stored bytes when it still has them."""
    if isinstance(snapshot, EncodedSnapshot):
        return snapshot.encoded
    return pack(snapshot.to_dict())


def _decode_specs_bytes(data: bytes) -> tuple[LayerSpec, ...]:
    return specs_from_stored(unpack(data))


@dataclass(frozen=True, slots=True)
class Codec:
    """Encodes and decodes session hashes within the configured size limits."""

    max_snapshot_bytes: int = 4 * 1024 * 1024
    max_specs_bytes: int = 1024 * 1024

    def encode_snapshot(self, snapshot: Snapshot) -> bytes:
        return self._bounded("snapshot", pack(snapshot.to_dict()), self.max_snapshot_bytes)

    def encode_specs(self, specs: tuple[LayerSpec, ...]) -> bytes:
        return self._bounded("layer_specs", pack(specs_to_list(specs)), self.max_specs_bytes)

    @staticmethod
    def _bounded(what: str, data: bytes, limit: int) -> bytes:
        if len(data) > limit:
            raise PayloadTooLarge(f"encoded {what} is {len(data)} bytes; the limit is {limit}")
        return data

    def write_fields(self, write: SessionWrite) -> list[bytes | str]:
        """Flat ``field, value, ...`` pairs for a script; an empty value deletes the field."""
        pairs: list[bytes | str] = [
            SNAPSHOT,
            self.encode_snapshot(write.snapshot),
            LAYER_SPECS,
            self.encode_specs(write.layer_specs),
        ]
        for name in WRITE_TEXT_FIELDS:
            pairs += [name, getattr(write, name) or ""]
        return pairs

    def stored_fields(self, session: StoredSession) -> list[bytes | str]:
        """All fields of a stored session (for ``fill``), as flat pairs."""
        pairs = self.write_fields(session.data)
        pairs += ["status", session.status.value, "version", str(session.version)]
        pairs += ["flushed_version", str(session.flushed_version)]
        pairs += ["closed_by", session.closed_by.value if session.closed_by else ""]
        for name in STATE_TEXT_FIELDS:
            pairs += [name, getattr(session, name) or ""]
        return pairs

    def decode_session(
        self, name: str, key: SessionKey, raw: Mapping[bytes, bytes], *, lazy: bool = False
    ) -> StoredSession:
        """Build a :class:`StoredSession` from an ``HGETALL`` reply of key ``name``.

        With ``lazy`` the snapshot stays encoded (:class:`EncodedSnapshot`) until read.
        """
        fields = _Fields(name, raw)
        write = unchecked(
            SessionWrite,
            snapshot=fields.binary(SNAPSHOT, _encoded_snapshot if lazy else _decode_snapshot_bytes),
            layer_specs=fields.binary(LAYER_SPECS, _decode_specs_bytes),
            **{f: fields.identifier(f) for f in REQUIRED_ID_FIELDS},
            **{f: fields.identifier(f, required=False) for f in OPTIONAL_ID_FIELDS},
        )
        closed_by = fields.text("closed_by")
        return StoredSession(
            key=key,
            status=fields.enum("status", SessionStatus),
            version=fields.integer("version"),
            flushed_version=fields.integer("flushed_version", default=0),
            data=write,
            created_at=fields.text("created_at"),
            updated_at=fields.text("updated_at"),
            cleaned_at=fields.text("cleaned_at"),
            closed_by=fields.enum("closed_by", ClosedBy) if closed_by else None,
            cleanup_error=fields.text("cleanup_error"),
            lineage=fields.text("lineage"),
        )


class _Fields:
    """Typed access to one hash reply, raising :class:`CorruptValue` for the field at fault."""

    def __init__(self, name: str, raw: Mapping[bytes, bytes]) -> None:
        self.name = name
        self.raw = {key.decode(errors="replace"): value for key, value in raw.items()}

    def _fail(self, field: str, reason: str) -> CorruptValue:
        return CorruptValue(self.name, field, reason)

    def text(self, field: str) -> str | None:
        value = self.raw.get(field)
        if value is None:
            return None
        try:
            return value.decode()
        except UnicodeDecodeError as exc:
            raise self._fail(field, "not UTF-8 text") from exc

    def required(self, field: str) -> str:
        value = self.text(field)
        if not value:
            raise self._fail(field, "missing")
        return value

    def identifier(self, field: str, *, required: bool = True) -> str | None:
        value = self.text(field)
        if value is None and not required:
            return None
        try:
            return check_id(field, value)
        except InvalidId as exc:
            raise self._fail(field, str(exc)) from exc

    def integer(self, field: str, default: int | None = None) -> int:
        value = self.text(field)
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

    def binary(self, field: str, decode: Callable[[bytes], T]) -> T:
        value = self.raw.get(field)
        if value is None:
            raise self._fail(field, "missing")
        try:
            return decode(value)
        except (InvalidSnapshot, ValueError, TypeError) as exc:
            raise self._fail(field, f"not a msgpack {field}: {exc}") from exc
