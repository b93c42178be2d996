"""Postgres failures, split by what the flush job should do about them (DESIGN §5.4).

::

    PersistenceError            (cache.errors) anything else: a bug or a schema mismatch
    ├── PersistenceUnavailable  the server could not be reached or gave up: retry with backoff
    │   └── DatabaseMissing     the server answers but has no database of that name
    ├── TransactionConflict     the transaction lost a race (serialization failure, deadlock,
    │                           lock not available): retry it; if it keeps failing, split the
    │                           batch so that one row cannot hold the others
    └── RowRejected             Postgres refused the data itself: retrying cannot help, so the
                                offending row goes to the shard's poison hash

``translate_errors`` is the only place that looks at driver exceptions; everything above
``persistence`` sees these three types, each raised ``from`` the original.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from cache.errors import PersistenceError

__all__ = [
    "DatabaseMissing",
    "PersistenceError",
    "PersistenceUnavailable",
    "RowRejected",
    "TransactionConflict",
    "translate_errors",
]


class PersistenceUnavailable(PersistenceError):
    """Postgres could not be reached, lost the connection, timed out or is shutting down."""


class DatabaseMissing(PersistenceUnavailable):
    """The server answers, but the database ``DATABASE_URL`` names does not exist."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        """The URL whose database is missing (it may hold a password: never log it as is)."""
        super().__init__(f"database {make_url(database_url).database!r} does not exist")


class TransactionConflict(PersistenceError):
    """The transaction lost a race with another one (SQLSTATE class 40 or 55); retry it."""


class RowRejected(PersistenceError):
    """Postgres refused the data of a statement (bad encoding, NUL bytes, a constraint)."""


_BY_SQLSTATE_CLASS: Final[dict[str, type[PersistenceError]]] = {
    # Postgres refused the data: data exception, integrity violation, program limit exceeded
    # (a jsonb too large). The same row will be refused again.
    "22": RowRejected,
    "23": RowRejected,
    "54": RowRejected,
    # The transaction lost a race: rollback (serialization failure, deadlock), object not in
    # prerequisite state (lock not available). The same statement may well pass next time.
    "40": TransactionConflict,
    "55": TransactionConflict,
    # The server, not the statement: connection, resources, operator intervention (shutdown,
    # statement timeout), system error.
    "08": PersistenceUnavailable,
    "53": PersistenceUnavailable,
    "57": PersistenceUnavailable,
    "58": PersistenceUnavailable,
}

_BY_TYPE: Final[tuple[tuple[tuple[type[BaseException], ...], type[PersistenceError]], ...]] = (
    (
        (
            UnicodeError,  # text the client cannot even encode (a lone surrogate)
            sa_exc.DataError,
            sa_exc.IntegrityError,
            psycopg.DataError,
            psycopg.IntegrityError,
        ),
        RowRejected,
    ),
    (
        (
            sa_exc.OperationalError,
            sa_exc.InterfaceError,
            sa_exc.TimeoutError,
            sa_exc.DisconnectionError,
            psycopg.OperationalError,
            psycopg.InterfaceError,
            TimeoutError,
            ConnectionError,
        ),
        PersistenceUnavailable,
    ),
    ((sa_exc.SQLAlchemyError, psycopg.Error), PersistenceError),
)
"""Fallback for errors without a SQLSTATE (raised client-side), most specific first."""


def _sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a psycopg error, wrapped by SQLAlchemy or not (``None`` if client-side)."""
    original = getattr(error, "orig", None) or error
    state = getattr(original, "sqlstate", None)
    return state if isinstance(state, str) and len(state) == 5 else None


def _by_type(error: BaseException | None) -> type[PersistenceError] | None:
    return next((kind for types, kind in _BY_TYPE if isinstance(error, types)), None)


def classify(error: BaseException) -> type[PersistenceError] | None:
    """Which project error ``error`` is, or ``None`` when it is not a database error at all.

    The SQLSTATE class decides first, because psycopg files some data problems (class 54)
    under ``OperationalError``; client-side errors (no SQLSTATE) are judged by the driver's
    exception type, then by SQLAlchemy's wrapper type.
    """
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return PersistenceUnavailable
    state = _sqlstate(error)
    if state is not None and state[:2] in _BY_SQLSTATE_CLASS:
        return _BY_SQLSTATE_CLASS[state[:2]]
    return _by_type(getattr(error, "orig", None)) or _by_type(error)


def _describe(error: BaseException) -> str:
    """The driver's message without SQLAlchemy's multi-line SQL and parameter dump."""
    original = getattr(error, "orig", None) or error
    return str(original).strip().splitlines()[0] if str(original).strip() else repr(original)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise SQLAlchemy and psycopg errors as the project's types, ``from`` the original."""
    try:
        yield
    except PersistenceError:
        raise
    except Exception as error:
        kind = classify(error)
        if kind is None:
            raise
        raise kind(f"{type(error).__name__}: {_describe(error)}") from error
