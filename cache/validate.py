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
from itertools import chain
from typing import Any, Final

from cache.errors import InvalidId, InvalidInput, InvalidSnapshot

MAX_ID_LENGTH: Final = 255
MAX_JSON_DEPTH: Final = 100
"""Containers nested inside one JSON value (a runtime state, a config, a metadata object)."""
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**64 - 1
"""msgpack's integer range (signed 64 bits for negatives, unsigned 64 bits for positives)."""
VERSION_MAX: Final = 2**63 - 1
_JSON_TYPES: Final = frozenset({dict, list, str, int, float, bool, type(None)})


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


_VALID_IDS: dict[str, None] = {}
"""IDs already found usable (a loop checks the same few every iteration); bounded."""
_VALID_IDS_MAX: Final = 65_536


def check_id(name: str, value: object) -> str:
    """Return ``value`` if it is a usable ID: a string of 1-255 storable characters."""
    if type(value) is not str:
        raise InvalidId(f"{name} must be a string, got {type(value).__name__}")
    if value in _VALID_IDS:
        return value
    _check_new_id(name, value)
    if len(_VALID_IDS) >= _VALID_IDS_MAX:
        _VALID_IDS.clear()
    _VALID_IDS[value] = None
    return value


def _check_new_id(name: str, value: str) -> None:
    if not value:
        raise InvalidId(f"{name} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidId(f"{name} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}")
    problem = text_problem(value, nul_ok=False)
    if problem:
        raise InvalidId(f"{name} {problem}")


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
    """Raise :class:`InvalidSnapshot` (naming ``where``) unless ``value`` is storable JSON.

    Level by level rather than value by value: each level's types, floats, keys and
    containers are checked with one C-level pass each, so the cost is per level and per
    container, not a Python step per scalar. Integers beyond 64 bits and lone surrogates are
    refused when the value is encoded (msgpack cannot hold them); NUL is checked here where
    Postgres stores the text (``nul_ok=False``).
    """
    level: list[Any] = [value]
    depth = 0
    while level:
        _check_scalars(where, level, nul_ok)
        containers = [v for v in level if type(v) is dict or type(v) is list]
        if not containers:
            return
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise InvalidSnapshot(f"{where}: nests deeper than {MAX_JSON_DEPTH} levels")
        dicts = [c for c in containers if type(c) is dict]
        if dicts:
            keys = list(chain.from_iterable(dicts))
            if any(type(k) is not str for k in keys):
                bad = next(k for k in keys if type(k) is not str)
                raise InvalidSnapshot(f"{where}: object keys must be strings, got {bad!r}")
            if not nul_ok:
                _check_texts(where, keys)
        level = list(
            chain.from_iterable([c.values() if type(c) is dict else c for c in containers])
        )


def _check_scalars(where: str, level: list[Any], nul_ok: bool) -> None:
    kinds = set(map(type, level))
    if not kinds <= _JSON_TYPES:
        bad = next(k for k in kinds if k not in _JSON_TYPES)
        raise InvalidSnapshot(f"{where}: {bad.__name__} is not a JSON value")
    if float in kinds:
        floats = [v for v in level if type(v) is float]
        if not all(map(math.isfinite, floats)):
            raise InvalidSnapshot(
                f"{where}: {next(f for f in floats if not math.isfinite(f))!r} "
                "is not a finite number"
            )
    if not nul_ok and str in kinds:
        _check_texts(where, [v for v in level if type(v) is str])


def _check_texts(where: str, texts: list[str]) -> None:
    for text in texts:
        problem = text_problem(text, nul_ok=False)
        if problem:
            raise InvalidSnapshot(f"{where}: text {text[:20]!r} {problem}")


def check_json_object(where: str, value: object, *, nul_ok: bool = True) -> dict[str, Any]:
    """:func:`check_json` for a value that must be an object; returns it."""
    if type(value) is not dict:
        raise InvalidSnapshot(f"{where} must be an object with string keys")
    check_json(where, value, nul_ok=nul_ok)
    return value
