"""A loopback HTTP/1.1 server that misbehaves on purpose, for the backend client's tests.

Raw sockets rather than ``http.server``: the misbehaviours (a status line dribbled byte by
byte, a reset in mid-body, a 300 MB body) need control of every byte that is sent. Each
connection is served by its own thread: it reads one request, then hands the connection to
the server's current :data:`Behaviour`. Every answer that completes says
``connection: close``, so each request of the client arrives on a fresh connection.

Behaviours pace themselves with :meth:`HostileServer.pause`, which returns early when the
server stops, so a trickle "forever" ends with the test.
"""

from __future__ import annotations

import gzip
import json
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

Behaviour = Callable[["HostileServer", socket.socket], None]

MB = 1000 * 1000
HUGE_BYTES = 300 * MB
"""The oversized answers' length: far over any cap, and far over a test's memory bound."""
_CHUNK = b" " * 65536  # JSON whitespace: the body is "valid so far" for as long as it goes on
_REASONS = {200: "OK", 404: "Not Found", 422: "Unprocessable Entity", 500: "Error", 503: "Busy"}


class HostileServer:
    """Serves every request with ``behaviour`` (which may be swapped between calls)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[str] = []
        self.client_gone = threading.Event()
        """Set when a send failed: the client dropped the connection before the answer ended."""
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> Self:
        self._spawn(self._accept_loop)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self._listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=10)
            assert not thread.is_alive(), "a hostile connection thread did not stop"

    def pause(self, seconds: float) -> bool:
        """Wait ``seconds``; ``False`` if the server is stopping (then stop misbehaving)."""
        return not self._stopping.wait(seconds)

    def wait_for_stop(self) -> None:
        self._stopping.wait()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.requests.append(_read_request(conn))
                self.behaviour(self, conn)
            except OSError:  # reset / broken pipe: the client gave up on this answer
                self.client_gone.set()


def _read_request(conn: socket.socket) -> str:
    """Read one request (head and ``Content-Length`` body); its request line."""
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionResetError("client closed before sending a request")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    conn.settimeout(None)
    return lines[0]


def head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Whatever')}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def respond(
    status: int,
    body: bytes,
    content_type: str | None = "application/json",
    extra: dict[str, str] | None = None,
) -> Behaviour:
    """A complete, well-framed answer (its content may still be anything)."""
    headers = {"content-length": str(len(body)), "connection": "close"}
    if content_type is not None:
        headers["content-type"] = content_type
    headers.update(extra or {})

    def behaviour(server: HostileServer, conn: socket.socket) -> None:
        conn.sendall(head(status, headers) + body)

    return behaviour


def respond_chunked(status: int, body: bytes) -> Behaviour:
    """A complete JSON answer without a ``Content-Length``: its size shows only as it is read."""

    def behaviour(server: HostileServer, conn: socket.socket) -> None:
        headers = {"content-type": "application/json", "transfer-encoding": "chunked"}
        conn.sendall(head(status, headers))
        for start in range(0, len(body), 1000):
            piece = body[start : start + 1000]
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.sendall(b"0\r\n\r\n")

    return behaviour


def status_json(run_id: str = "r1", status: str = "running") -> dict[str, object]:
    now = "2025-01-01T00:00:00Z"
    return {"run_id": run_id, "status": status, "created_at": now, "updated_at": now}


def status_body(run_id: str = "r1", status: str = "running") -> bytes:
    return json.dumps(status_json(run_id, status)).encode()


# ----------------------------------------------------------------------- misbehaviours


def trickle_body(server: HostileServer, conn: socket.socket) -> None:
    """Headers at once, then one byte of body every 0.5 s, for ever."""
    conn.sendall(head(200, {"content-type": "application/json", "content-length": str(MB)}))
    while server.pause(0.5):
        conn.sendall(b" ")


def trickle_head(server: HostileServer, conn: socket.socket) -> None:
    """The status line and one endless header, one byte every 0.5 s."""
    for byte in b"HTTP/1.1 200 OK\r\nx-pad: ":
        conn.sendall(bytes([byte]))
        if not server.pause(0.5):
            return
    while server.pause(0.5):
        conn.sendall(b"a")


def stall_after_head(server: HostileServer, conn: socket.socket) -> None:
    """Headers promising a body that never comes."""
    conn.sendall(head(200, {"content-type": "application/json", "content-length": "100"}))
    server.wait_for_stop()


def never_answer(server: HostileServer, conn: socket.socket) -> None:
    """Reads the request, then says nothing at all."""
    server.wait_for_stop()


def _stream(conn: socket.socket, server: HostileServer, total: int, *, chunked: bool) -> None:
    sent = 0
    piece = b"%x\r\n%s\r\n" % (len(_CHUNK), _CHUNK) if chunked else _CHUNK
    while sent < total and server.pause(0):
        conn.sendall(piece)
        sent += len(_CHUNK)
    if chunked:
        conn.sendall(b"0\r\n\r\n")


def huge_chunked(server: HostileServer, conn: socket.socket) -> None:
    """A 300 MB chunked body: no ``Content-Length`` announces its size."""
    conn.sendall(head(200, {"content-type": "application/json", "transfer-encoding": "chunked"}))
    _stream(conn, server, HUGE_BYTES, chunked=True)


def huge_declared(server: HostileServer, conn: socket.socket) -> None:
    """A ``Content-Length`` of 300 MB, and the bytes to go with it."""
    headers = {"content-type": "application/json", "content-length": str(HUGE_BYTES)}
    conn.sendall(head(200, headers))
    _stream(conn, server, HUGE_BYTES, chunked=False)


def huge_error(server: HostileServer, conn: socket.socket) -> None:
    """A 500 whose error page is 300 MB long."""
    conn.sendall(head(500, {"content-type": "text/html", "transfer-encoding": "chunked"}))
    _stream(conn, server, HUGE_BYTES, chunked=True)


def _reset(conn: socket.socket) -> None:
    """Make the coming close() send a TCP RST instead of a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reset_mid_body(server: HostileServer, conn: socket.socket) -> None:
    conn.sendall(head(200, {"content-type": "application/json", "content-length": "1000"}))
    conn.sendall(b'{"run_id": "r1", ')
    _reset(conn)


def reset_before_answer(server: HostileServer, conn: socket.socket) -> None:
    _reset(conn)


def close_mid_body(server: HostileServer, conn: socket.socket) -> None:
    """A clean FIN, but 980 bytes short of the promised body."""
    conn.sendall(head(200, {"content-type": "application/json", "content-length": "1000"}))
    conn.sendall(b'{"run_id": "r1", ')


def garbage(server: HostileServer, conn: socket.socket) -> None:
    conn.sendall(b"SURPRISE \x00\xff not http at all\r\n\r\n")


def _bomb() -> bytes:
    """300 MB of spaces as 300 gzip members of 1 MB each (about 300 KB): a multi-member
    gzip body inflates to the concatenation of its members (RFC 1952)."""
    return gzip.compress(b" " * MB, compresslevel=9) * (HUGE_BYTES // MB)


def gzip_bomb(server: HostileServer, conn: socket.socket) -> None:
    """A small gzip body that inflates to 300 MB: refused, never inflated."""
    respond(200, _bomb(), extra={"content-encoding": "gzip"})(server, conn)


def running_then(later: Behaviour) -> Behaviour:
    """A valid ``running`` status for the first request, then ``later`` for every other."""
    first = respond(200, status_body())

    def behaviour(server: HostileServer, conn: socket.socket) -> None:
        (first if len(server.requests) == 1 else later)(server, conn)

    return behaviour
