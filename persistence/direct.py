"""Plain psycopg connections for the flush's upsert: one per thread, in autocommit.

The upsert is one statement, so it needs no transaction block: through the engine's pool it
cost a pre-ping ``SELECT 1``, a ``BEGIN`` and a ``COMMIT`` beside the statement itself, four
round trips where one does. psycopg prepares the statement on the server after a few
executions on a connection, so a worker's later flushes skip parsing and planning it.

A connection that fails with the server unreachable is dropped, and the statement is tried
once more on a new one if the old one had been used before (it may have died while idle, the
case ``pool_pre_ping`` covered). Sending the upsert twice is harmless: the version fence
keeps the second from changing anything the first one wrote.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import psycopg
from sqlalchemy.engine import URL

from persistence.errors import PersistenceUnavailable, classify

Params = Sequence[Any]
"""The values of a statement's ``$1``, ``$2``, ... in order."""


class DirectConnections:
    """Autocommit psycopg connections to the database at ``url``, one per thread."""

    def __init__(self, url: URL, *, connect_timeout_s: int) -> None:
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._timeout = connect_timeout_s
        self._local = threading.local()
        self._made: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()

    def execute(self, sql: bytes, params: Params) -> list[tuple[Any, ...]]:
        """Run ``sql`` (``$n`` placeholders, sent as it is) and return every row it returns;
        driver errors pass through."""
        conn, used = self._connection()
        try:
            return self._run(conn, sql, params)
        except psycopg.Error as exc:
            if classify(exc) is not PersistenceUnavailable:
                raise
            self._drop(conn)
            if not used:
                raise
        conn, _ = self._connection()
        try:
            return self._run(conn, sql, params)
        except psycopg.Error as exc:
            if classify(exc) is PersistenceUnavailable:
                self._drop(conn)
            raise

    @staticmethod
    def _run(conn: psycopg.Connection[Any], sql: bytes, params: Params) -> list[tuple[Any, ...]]:
        with psycopg.RawCursor(conn) as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description is not None else []

    def _connection(self) -> tuple[psycopg.Connection[Any], bool]:
        """This thread's connection, and whether it has been used before."""
        owned: _Owned | None = getattr(self._local, "owned", None)
        if owned is not None and not owned.conn.closed and owned.pid == os.getpid():
            return owned.conn, True
        conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=self._timeout)
        self._local.owned = _Owned(conn)
        self._made.add(conn)
        return conn, False

    def _drop(self, conn: psycopg.Connection[Any]) -> None:
        self._local.owned = None
        conn.close()

    def close(self) -> None:
        """Close every connection this object made (any thread's)."""
        for conn in list(self._made):
            conn.close()


class _Owned:
    """A thread's connection, closed when the thread ends (its thread-locals are dropped
    then), so a pool of flusher threads leaves no connection open behind it."""

    __slots__ = ("conn", "pid")

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.pid = os.getpid()

    def __del__(self) -> None:
        if self.pid == os.getpid():  # never close a parent's connection from a forked child
            self.conn.close()
