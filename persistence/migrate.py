"""Apply the Alembic migrations from code (``agent-sessions migrate`` calls :func:`upgrade`).

The Alembic config is built here rather than read from an ``alembic.ini``: the script
directory is the installed ``persistence/migrations`` package, wherever it lives, and the
database URL never passes through configparser (a ``%`` in a password would break it).
:func:`upgrade_sql` and :func:`downgrade_sql` write the statements instead of running them
(Alembic's offline mode; no database is needed). Reading where a database's schema is
needs no Alembic: :mod:`persistence.schema` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final, TextIO

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

from persistence.schema import (
    SchemaState,
    connection,
    current,
    database_missing,
    schema_state,
)

__all__ = [
    "SchemaState",
    "alembic_config",
    "current",
    "database_missing",
    "downgrade",
    "downgrade_sql",
    "head",
    "history",
    "locked_connection",
    "schema_state",
    "upgrade",
    "upgrade_sql",
]

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
    with connection(database_url) as conn:
        _serialise(conn)
        yield conn


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
