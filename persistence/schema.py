"""Where a database's schema is, read without Alembic.

Every command and the worker pool check the schema before they start
(:func:`workers.preflight.check_database`); importing Alembic (and the template engine it
pulls in) costs about 0.2 s of every process start, so this module reads Alembic's
``alembic_version`` table with one query and compares it with :data:`REVISIONS`, the
migrations this build ships (``tests/unit/test_schema_revisions.py`` keeps it equal to
Alembic's own history). :mod:`persistence.migrate` runs the migrations.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine, make_url

from persistence.engine import create_engine
from persistence.errors import (
    DatabaseMissing,
    PersistenceError,
    PersistenceUnavailable,
    RowRejected,
    translate_errors,
)
from persistence.models import TABLE_NAME

REVISIONS: Final = ("0001", "0002", "0003", "0004", "0005", "0006")
"""The migrations this build ships, oldest first."""
HEAD: Final = REVISIONS[-1]
"""The newest revision of this build (what ``agent-sessions migrate`` goes to)."""


@dataclass(frozen=True, slots=True)
class SchemaState:
    """Where a database's schema is, against what this build ships."""

    current: str | None
    """The database's revision (``None``: never migrated)."""
    head: str | None
    """The newest revision of this build."""
    known: bool
    """Whether this build knows ``current`` (a newer build may have migrated further)."""

    @property
    def at_head(self) -> bool:
        return self.current == self.head


def schema_state(database_url: str) -> SchemaState:
    """The database's revision beside this build's head.

    Raises :class:`DatabaseMissing` when the server answers but has no such database, and
    :class:`PersistenceUnavailable` when it does not answer.
    """
    revision = current(database_url)
    return SchemaState(revision, HEAD, revision is None or revision in REVISIONS)


def current(database_url: str) -> str | None:
    """The revision the database is at (Alembic's ``alembic_version`` table), or ``None`` if
    it was never migrated."""
    with connection(database_url) as conn:
        if conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is None:
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


@contextmanager
def schema_errors() -> Iterator[None]:
    """Like ``translate_errors``, but a refused DDL statement is a schema problem, not a row."""
    try:
        with translate_errors():
            yield
    except RowRejected as error:
        raise PersistenceError(str(error)) from error.__cause__


def _connect(engine: Engine, database_url: str) -> Connection:
    """A connection of ``engine``; :class:`DatabaseMissing` when the server answers but lacks
    the database."""
    try:
        with schema_errors():
            return engine.connect()
    except PersistenceUnavailable as exc:
        if database_missing(database_url):
            raise DatabaseMissing(database_url) from exc
        raise


@contextmanager
def connection(database_url: str) -> Iterator[Connection]:
    """One connection in one transaction (DDL is transactional in Postgres), then dispose;
    :class:`DatabaseMissing` when the server answers but lacks the database."""
    engine = create_engine(database_url, pool_pre_ping=False)
    try:
        with _connect(engine, database_url) as conn, schema_errors(), conn.begin():
            yield conn
    finally:
        engine.dispose()


def database_missing(database_url: str) -> bool:
    """Whether the server of ``database_url`` answers and lacks its database (asked through
    the ``postgres`` maintenance database; ``False`` when that cannot be asked either)."""
    url = make_url(database_url)
    engine = create_engine(url.set(database="postgres").render_as_string(hide_password=False))
    try:
        with translate_errors(), engine.connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": url.database}
            ).first()
    except PersistenceError:
        return False
    finally:
        engine.dispose()
    return found is None


_AUTOVACUUM: Final = text(
    "SELECT current_setting('autovacuum') = 'on',"
    " coalesce((SELECT option_value FROM pg_options_to_table(c.reloptions)"
    "  WHERE option_name = 'autovacuum_enabled'), 'on') IN ('on', 'true', 'yes', '1')"
    " FROM pg_class AS c WHERE c.oid = to_regclass(:table)"
)


def autovacuum_advice(database_url: str, table: str = TABLE_NAME) -> str | None:
    """Why Postgres may never vacuum or analyze the sessions table (autovacuum off, on the
    server or for the table), with what to do; ``None`` when autovacuum runs (or the table
    does not exist yet).

    Every flush updates rows in place: without vacuuming, their dead versions pile up in the
    table and its indexes; without statistics, queries are planned on guesses. (The flush's
    own fence no longer depends on them: each owner's indexes are partial,
    ``persistence.models.OWNER_ROWS``; before, a never-analyzed table made it read every
    row of a tenant per flushed row.)
    """
    with connection(database_url) as conn:
        found = conn.execute(_AUTOVACUUM, {"table": table}).first()
    if found is None or (found[0] and found[1]):
        return None
    where = "on this server" if not found[0] else f"for table {table}"
    return (
        f"autovacuum is off {where}: Postgres never vacuums or analyzes {table}, whose rows "
        "every flush updates, so their dead versions pile up and queries are planned "
        f"without statistics; turn autovacuum on, or run VACUUM (ANALYZE) {table} regularly"
    )
