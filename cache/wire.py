"""Hot-path commands on one pinned connection per thread, sent and read raw.

redis-py spends more per command on its own machinery (a pool checkout and return, the
client's command dispatch, response callbacks) than Redis spends answering a small command.
The two calls a loop iteration makes (a load and a save), and a flush's reads and scripts, go
through :class:`Wire` instead: each thread keeps one connection of its own for good, packs
its commands itself, and reads the raw RESP replies. Everything else uses the client as
usual.

Only for a standalone Redis; a cluster client routes by key and keeps its own connections.
The connections are made with the pool's settings but outside its limit (a thread pool
larger than the pool must not exhaust it): :meth:`Wire.close` closes them, a thread's goes
with the thread, a forked child makes its own.
A connection error disconnects it (the next call reconnects): reads are retried once, a write
is not (it may have been applied), the caller gets the error.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import NoScriptError
from redis.utils import HIREDIS_AVAILABLE

if HIREDIS_AVAILABLE:
    from hiredis import pack_command

Command = Sequence[Any]


class Wire:
    """Raw commands on this thread's pinned connection of ``client``'s pool."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._local = threading.local()
        self._made: weakref.WeakSet[Any] = weakref.WeakSet()

    def _connection(self) -> Any:  # a redis.connection.Connection (its methods are untyped)
        conn: Any = getattr(self._local, "conn", None)
        if conn is None or conn.pid != os.getpid():
            conn = self._pool.connection_class(**self._pool.connection_kwargs)
            self._local.conn = conn
            self._made.add(conn)
        return conn

    def close(self) -> None:
        """Disconnect every connection this wire made (any thread's)."""
        for conn in list(self._made):
            conn.disconnect()

    def run(self, commands: Sequence[Command], *, retry: bool) -> list[Any]:
        """Send ``commands`` in one write, read every reply; a reply that is an error is
        returned as the exception instance (the rest are still read). ``retry`` resends once
        after a lost connection: only for commands that change nothing."""
        try:
            return self._exchange(commands)
        except (redis.ConnectionError, redis.TimeoutError):
            if not retry:
                raise
            return self._exchange(commands)

    def _exchange(self, commands: Sequence[Command]) -> list[Any]:
        conn = self._connection()
        try:
            conn.send_packed_command(_packed(conn, commands))
            return [self._reply(conn) for _ in commands]
        except BaseException:
            conn.disconnect()
            raise

    @staticmethod
    def _reply(conn: Any) -> Any:
        try:
            return conn.read_response()
        except redis.ResponseError as exc:
            return exc

    def evalsha(self, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """``EVALSHA`` of a registered script (loaded once more if Redis lost it); a write,
        so never resent after a lost connection."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        (reply,) = self.run([command], retry=False)
        if isinstance(reply, NoScriptError):
            self.run([("SCRIPT", "LOAD", script.script)], retry=True)
            (reply,) = self.run([command], retry=False)
        if isinstance(reply, Exception):
            raise reply
        return reply


def _packed(conn: Any, commands: Sequence[Command]) -> Any:
    """The RESP bytes of ``commands`` as one chunk: hiredis packs each in one C call
    (redis-py's packer first copies every argument in a Python loop, 8 µs of a save's 26)."""
    if not HIREDIS_AVAILABLE:
        return conn.pack_commands(commands)
    return [b"".join(pack_command(tuple(command)) for command in commands)]
