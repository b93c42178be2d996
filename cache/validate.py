"""The input contract: what the store accepts is exactly what can land everywhere it goes.

Every value a caller hands in is checked here, once, before anything touches Redis or
Postgres, so that whatever the store accepts can reach Redis (msgpack), Postgres (``varchar``,
``jsonb``, ``bytea``) and the agent backend (JSON, pydantic) unchanged:

* **IDs and names**: ``str``, 1-255 characters, valid Unicode (no lone surrogates: UTF-8
  cannot encode them), no NUL (Postgres text refuses it).
* **JSON values** (layer states, spec configs, metadata): exact ``dict`` (string keys),
  ``list``, ``str``, ``int``, ``float``, ``bool`` or ``None``; integers within msgpack's 64
  bits; finite floats only (``jsonb`` has no NaN, and the backend's JSON would get ``null``);
  text as for IDs, except that NUL is allowed where the value is stored as bytes (a snapshot's
  runtime state), not where Postgres stores it as ``jsonb`` (layer specs); nested at most
  :data:`MAX_JSON_DEPTH` containers deep (the backend protocol's parser refuses a document
  deeper than 255 levels, and a snapshot sits ~6 levels into a request).
* **Versions**: exact ``int`` (not ``bool``, not ``"1"``), ``0 <= v < 2**63``.

The walk is iterative, so no input can exhaust the interpreter's stack. Every refusal is an
:class:`InvalidInput` subclass whose message names the field.
"""

from __future__ import annotations

import math
from typing import Any, Final

from cache.errors import InvalidId, InvalidInput, InvalidSnapshot

MAX_ID_LENGTH: Final = 255
MAX_JSON_DEPTH: Final = 100
"""Containers nested inside one JSON value (a runtime state, a config, a metadata object)."""
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**64 - 1
"""msgpack's integer range (signed 64 bits for negatives, unsigned 64 bits for positives)."""
VERSION_MAX: Final = 2**63 - 1


def text_problem(value: str, *, nul_ok: bool) -> str | None:
    """Why ``value`` cannot be stored as text, or ``None``."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode (a lone surrogate)"
    if not nul_ok and "\x00" in value:
        return "contains a NUL character, which Postgres cannot store"
    return None


def storable_text(value: str, limit: int) -> str:
    """Free text we generate from foreign input (an error message) made storable: at most
    ``limit`` characters, lone surrogates replaced, NUL spelled out."""
    text = value[:limit].encode("utf-8", "replace").decode("utf-8")
    return text.replace("\x00", "\\x00")


def check_id(name: str, value: object) -> str:
    """Return ``value`` if it is a usable ID: a string of 1-255 storable characters."""
    if type(value) is not str:
        raise InvalidId(f"{name} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidId(f"{name} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidId(f"{name} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}")
    problem = text_problem(value, nul_ok=False)
    if problem:
        raise InvalidId(f"{name} {problem}")
    return value


def check_optional_id(name: str, value: object) -> str | None:
    """Like :func:`check_id`, but ``None`` is allowed."""
    return None if value is None else check_id(name, value)


def check_name(where: str, value: object) -> str:
    """A layer or spec name (or type): an ID by another name, refused as a snapshot error."""
    try:
        return check_id(where, value)
    except InvalidId as exc:
        raise InvalidSnapshot(str(exc)) from None


def check_version(name: str, value: object) -> int:
    """An exact, non-negative 64-bit integer (a ``bool`` or ``"1"`` is refused)."""
    if type(value) is not int:
        raise InvalidInput(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= VERSION_MAX:
        raise InvalidInput(f"{name} must be between 0 and {VERSION_MAX}, got {value}")
    return value


def check_json(where: str, value: object, *, nul_ok: bool = True) -> None:
    """Raise :class:`InvalidSnapshot` (naming ``where``) unless ``value`` is storable JSON."""
    _JsonWalk(where, nul_ok).run(value)


def check_json_object(where: str, value: object, *, nul_ok: bool = True) -> dict[str, Any]:
    """:func:`check_json` for a value that must be an object; returns it."""
    if type(value) is not dict:
        raise InvalidSnapshot(f"{where} must be an object with string keys")
    check_json(where, value, nul_ok=nul_ok)
    return value


class _JsonWalk:
    """One iterative walk over a JSON value: containers go on a stack, scalars are checked
    in place (no recursion, no per-scalar stack entries)."""

    __slots__ = ("nul_ok", "where")

    def __init__(self, where: str, nul_ok: bool) -> None:
        self.where = where
        self.nul_ok = nul_ok

    def run(self, value: object) -> None:
        stack: list[tuple[object, int]] = [(value, 0)]
        while stack:
            item, depth = stack.pop()
            kind = type(item)
            if kind is dict or kind is list:
                if depth >= MAX_JSON_DEPTH:
                    raise self.fail(f"nests deeper than {MAX_JSON_DEPTH} levels")
                children = self.children(item)  # type: ignore[arg-type]
                stack += [(child, depth + 1) for child in children]
            else:
                self.scalar(item)

    def children(self, item: dict[object, object] | list[object]) -> list[object]:
        """The container's values that are containers themselves; scalars checked here."""
        if type(item) is list:
            values: list[object] = item
        else:
            for key in item:
                if type(key) is not str:
                    raise self.fail(f"object keys must be strings, got {key!r}")
                self.text(key)
            values = list(item.values())  # type: ignore[union-attr]
        nested: list[object] = []
        for child in values:
            if type(child) is dict or type(child) is list:
                nested.append(child)
            else:
                self.scalar(child)
        return nested

    def scalar(self, item: object) -> None:
        kind = type(item)
        if kind is str:
            self.text(item)  # type: ignore[arg-type]
        elif kind is int:
            if not INT_MIN <= item <= INT_MAX:  # type: ignore[operator]
                raise self.fail(f"integer {item} does not fit in 64 bits")
        elif kind is float:
            if not math.isfinite(item):  # type: ignore[arg-type]
                raise self.fail(f"{item!r} is not a finite number")
        elif item is not None and kind is not bool:
            raise self.fail(f"{kind.__name__} is not a JSON value")

    def text(self, value: str) -> None:
        problem = text_problem(value, nul_ok=self.nul_ok)
        if problem:
            raise self.fail(f"text {value[:20]!r} {problem}")

    def fail(self, why: str) -> InvalidSnapshot:
        return InvalidSnapshot(f"{self.where}: {why}")
