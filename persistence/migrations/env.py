"""Alembic environment of this project's migrations, in the three ways they are run.

* ``persistence.migrate`` (``agent-sessions migrate``) builds the config in code and hands
  in an open connection (``config.attributes["connection"]``) that holds the migration
  lock, and the deployment's key prefix (``config.attributes["key_prefix"]``, which 0005
  gives existing rows), so the URL never passes through configparser.
* Offline mode (``agent-sessions migrate --sql``, ``alembic upgrade head --sql``) writes the
  PostgreSQL statements instead of running them; it needs no database.
* Alembic's own command line (``alembic.ini`` at the repository root) hands in nothing: the
  URL and the key prefix come from the environment (``DATABASE_URL``, ``ASC_KEY_PREFIX``)
  as for every command of the project, and the migration takes the same lock.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from cache.settings import Settings
from persistence.migrate import locked_connection
from persistence.models import metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_offline() -> None:
    """Render every statement as PostgreSQL text, values inlined, in one transaction."""
    context.configure(dialect_name="postgresql", target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    attributes = context.config.attributes
    connection = attributes.get("connection")
    if not isinstance(connection, Connection) and "key_prefix" not in attributes:
        attributes["key_prefix"] = Settings().key_prefix  # Alembic's own command line
    if context.is_offline_mode():
        _run_offline()
    elif isinstance(connection, Connection):
        _run(connection)
    else:
        with locked_connection(Settings().database_url) as own:
            _run(own)


main()
