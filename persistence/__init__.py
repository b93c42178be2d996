"""Postgres persistence, below ``workers`` and above ``cache``; one module per job:

* ``models``: the tables (``agent_runtime_sessions``, ``agent_session_owners``); ``migrations``
  and ``migrate``: Alembic, the only way the schema changes; ``schema``: where a database's
  schema is, read without importing Alembic (every process start checks it).
* ``engine``: the SQLAlchemy engine; ``direct``: the flush's own autocommit connections.
* ``rows``: session rows, built from a record or straight from a Redis hash's bytes.
* ``upsert``: the fenced batch upsert (its SQL in its docstring) and the sorting of refusals.
* ``owners``: ended workflow runs and conversations; ``counts``: the operators' counts;
  ``selects``: key columns, owner filters, row to record.
* ``repository``: ``SessionRepository``, one key prefix's reads and writes (the mixins above).
* ``errors``: Postgres failures sorted by what a flush should do about them.
"""
