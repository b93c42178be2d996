"""Apply the Alembic migrations from code (``agent-sessions migrate`` calls :func:`upgrade`).

The Alembic config is built here rather than read from an ``alembic.ini``: the script
directory is the installed ``persistence/migrations`` package, wherever it lives, and the
database URL never passes through configparser (a ``%`` in a password would break it).
:func:`upgrade_sql` and :func:`downgrade_sql` write the statements instead of running them
(Alembic's offline mode; no database is needed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
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

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK: Final = 0x61736373_6D696772  # "ascsmigr": one advisory lock key per database


def alembic_config(
    connection: Connection | None = None,
    key_prefix: str | None = None,
    *,
    output: TextIO | None = None,
) -> Config:
    """An Alembic config for this package's migrations, optionally bound to ``connection``;
    ``key_prefix`` is the deployment a migration assigns existing rows to (0005); ``output``
    receives the SQL of offline mode."""
    config = Config(output_buffer=output)
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    config.attributes["key_prefix"] = key_prefix
    return config


@contextmanager
def _schema_errors() -> Iterator[None]:
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
        with _schema_errors():
            return engine.connect()
    except PersistenceUnavailable as exc:
        if database_missing(database_url):
            raise DatabaseMissing(database_url) from exc
        raise


@contextmanager
def _connection(database_url: str) -> Iterator[Connection]:
    """One connection in one transaction (DDL is transactional in Postgres), then dispose."""
    engine = create_engine(database_url, pool_pre_ping=False)
    try:
        with _connect(engine, database_url) as connection, _schema_errors(), connection.begin():
            yield connection
    finally:
        engine.dispose()


def _serialise(connection: Connection) -> None:
    """Hold a transaction-scoped advisory lock, so processes migrating at once take turns.

    Several workers may run ``migrate`` on start-up; without the lock two of them could both
    see no table and the second ``CREATE TABLE`` would fail.
    """
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})


@contextmanager
def locked_connection(database_url: str) -> Iterator[Connection]:
    """A connection in a transaction that holds the migration lock (see :func:`_serialise`);
    :class:`DatabaseMissing` when the server answers but lacks the database."""
    with _connection(database_url) as connection:
        _serialise(connection)
        yield connection


def upgrade(database_url: str, revision: str = "head", *, key_prefix: str | None = None) -> None:
    """Migrate the database at ``database_url`` up to ``revision``; a no-op when already there.

    ``key_prefix``: the deployment that migrates (``ASC_KEY_PREFIX``); rows that predate
    deployments (revision 0005) become its rows (``asc`` when not given)."""
    with locked_connection(database_url) as connection:
        command.upgrade(alembic_config(connection, key_prefix), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Migrate down to ``revision`` (``base`` drops the table and everything in it)."""
    with locked_connection(database_url) as connection:
        command.downgrade(alembic_config(connection), revision)


def upgrade_sql(revision: str, output: TextIO, *, key_prefix: str | None = None) -> None:
    """Write the SQL that upgrades to ``revision`` to ``output``, touching no database.

    ``revision`` is ``head``, a revision, or ``FROM:TO`` (without ``FROM`` the script
    starts from an empty database). ``key_prefix`` as for :func:`upgrade`."""
    command.upgrade(alembic_config(key_prefix=key_prefix, output=output), revision, sql=True)


def downgrade_sql(revision: str, output: TextIO) -> None:
    """Write the SQL that downgrades ``FROM:TO`` (Alembic needs both ends offline)."""
    command.downgrade(alembic_config(output=output), revision, sql=True)


def current(database_url: str) -> str | None:
    """The revision the database is at, or ``None`` if it was never migrated."""
    with _connection(database_url) as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head() -> str | None:
    """The newest revision this package ships (what :func:`upgrade` goes to by default)."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def history() -> list[str]:
    """Every revision this package ships, newest first, as Alembic's ``history`` prints it:
    ``0004 -> 0005 (head), <what it does>``."""
    scripts = ScriptDirectory.from_config(alembic_config())
    return [
        script.cmd_format(False, include_branches=True, include_doc=True, include_parents=True)
        for script in scripts.walk_revisions()
    ]


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
    scripts = ScriptDirectory.from_config(alembic_config())
    known = revision is None or any(s.revision == revision for s in scripts.walk_revisions())
    return SchemaState(revision, scripts.get_current_head(), known)


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
