"""A TCP forwarder in front of a Redis server, for the faults a client cannot tell apart from
a real network's: a reply that never arrives, and a failover to another server at the same
address."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Self


class TcpProxy:
    """Forwards connections on ``127.0.0.1:<port>`` to ``upstream``.

    ``drop_next_reply()``: the next bytes the server sends are thrown away and that client's
    connection is closed; what the client sent was delivered, so the server applied it.
    ``retarget(upstream)``: every open connection is closed and new ones go to ``upstream``
    (a failover behind an unchanged address).
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._drop_next = threading.Event()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="tcp-proxy").start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def drop_next_reply(self) -> None:
        self._drop_next.set()

    def retarget(self, upstream: tuple[str, int]) -> None:
        with self._lock:
            self._upstream = upstream
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            _close(sock)

    def close(self) -> None:
        self._closed.set()
        _close(self._listener)
        self.retarget(self._upstream)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                server = socket.create_connection(self._upstream)
                self._open |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies and self._drop_next.is_set():
                    self._drop_next.clear()
                    break
                sink.sendall(data)
        except OSError:
            pass
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
