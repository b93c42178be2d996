"""Alembic environment: runs online only, on the connection ``persistence.migrate`` hands in.

There is no ``alembic.ini`` and no URL in here: ``persistence.migrate`` builds the config in
code and passes an open connection through ``config.attributes["connection"]``, so the URL is
never interpolated by configparser and the CLI and the tests share one code path.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from persistence.models import metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    """Refuse offline (SQL script) mode: every migration here is meant to run on a server."""
    connection = context.config.attributes.get("connection")
    if context.is_offline_mode() or not isinstance(connection, Connection):
        raise RuntimeError("run migrations through persistence.migrate (online, with a connection)")
    _run(connection)


main()
