"""Bounded HTTP plumbing of the agent-backend client: one total deadline per call.

Why httpx's own timeouts are not enough: httpx hands its ``read`` timeout to every single
``recv`` (httpcore ``SyncStream.read``), so a server that trickles one byte every half
second, in the headers or in the body, never trips it and holds the call for ever. Its ``pool``,
``connect`` and ``write`` timeouts have the same shape: each bounds one operation, none
bounds the call.

The mechanism: a call runs under a :class:`Deadline` (a point in monotonic time), made
current for the calling thread by :func:`bounded_by` (a ``ContextVar``, so threads sharing
one client do not see each other's deadlines). :class:`BoundedTransport` is httpx's HTTP/1.1
transport over httpcore's own connection pool, with one change: its network streams clamp
the timeout of every ``connect``, ``recv``, ``send`` and TLS handshake to the time left
until the current deadline, and refuse to start one once it has passed. Each socket
operation therefore ends by the deadline; a trickle only makes the next one shorter. No
watchdog thread is needed, and the bound holds in every phase (connect, request, status
line and headers, body), for fresh and pooled connections alike. What it cannot bound: the
DNS lookup of the backend's host name (``getaddrinfo`` takes no timeout; the resolver's own
``timeout``/``attempts`` in ``resolv.conf`` bound it, 5 s x 2 by default). An IP address or
an ``/etc/hosts`` name does not go to the network.

Why not a watchdog that shuts the socket down at the deadline: httpx exposes the socket
(``response.extensions["network_stream"]``) only once the headers are in, so a status line
dribbled byte by byte would go unwatched; and it costs a thread per request. httpcore is
httpx's own transport engine (httpx requires ``httpcore==1.*``), used here through its
public API only, so this adds no dependency.

Timeouts raised here are httpcore's, mapped to httpx's like ``httpx.HTTPTransport`` does,
so the client handles this transport and any other (``httpx.MockTransport``) alike.
Environment proxies are not used: the backend is an internal service, reached directly.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

__all__ = ["BoundedTransport", "Deadline", "bounded_by"]


class Deadline:
    """A point in ``time.monotonic()`` by which a call must be over, and its budget."""

    __slots__ = ("budget_s", "expires_at")

    def __init__(self, expires_at: float, budget_s: float) -> None:
        self.expires_at = expires_at
        self.budget_s = budget_s

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def sooner(self, seconds: float) -> Deadline:
        """The earlier of this deadline and ``seconds`` from now (a poll inside a wait)."""
        other = Deadline.after(seconds)
        return other if other.expires_at < self.expires_at else self

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, but never past the deadline."""
        time.sleep(max(0.0, min(seconds, self.remaining())))


_CURRENT: ContextVar[Deadline | None] = ContextVar("agent_backend_deadline", default=None)


@contextmanager
def bounded_by(deadline: Deadline) -> Iterator[None]:
    """Make ``deadline`` bound every socket operation of :class:`BoundedTransport` in this
    thread (and context) until the block exits."""
    token = _CURRENT.set(deadline)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _clamp(timeout: float | None, expired: type[httpcore.TimeoutException]) -> float | None:
    """``timeout`` cut to the current deadline; ``expired`` once the deadline passed.

    A timeout of exactly 0 would make the socket non-blocking (an ``OSError``, not a
    timeout), so an expired deadline raises here instead of reaching the socket.
    """
    deadline = _CURRENT.get()
    if deadline is None:
        return timeout
    remaining = deadline.remaining()
    if remaining <= 0:
        raise expired(f"the call's {deadline.budget_s:.3f}s deadline passed")
    return remaining if timeout is None else min(timeout, remaining)


class _BoundedStream(httpcore.NetworkStream):
    """A network stream whose every blocking operation ends by the current deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _clamp(timeout, httpcore.ConnectTimeout)
        return _BoundedStream(self._inner.start_tls(ssl_context, server_hostname, bounded))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _BoundedBackend(httpcore.NetworkBackend):
    """httpcore's synchronous socket backend, handing out :class:`_BoundedStream` s."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        """Try each address of ``host`` in turn, each with the time left.

        ``socket.create_connection`` (under ``SyncBackend``) would give *each* address the
        whole timeout, so a name with several unreachable addresses could take a multiple
        of it. Connecting to one resolved address at a time keeps the total to the deadline.
        """
        last_error: httpcore.ConnectError | None = None
        for address in _addresses(host, port):
            bounded = _clamp(timeout, httpcore.ConnectTimeout)
            try:
                stream = self._inner.connect_tcp(
                    address, port, bounded, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                last_error = exc
            else:
                return _BoundedStream(stream)
        raise last_error or httpcore.ConnectError(f"{host} has no address")

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _clamp(timeout, httpcore.ConnectTimeout)
        return _BoundedStream(self._inner.connect_unix_socket(path, bounded, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _addresses(host: str, port: int) -> list[str]:
    """The addresses of ``host``, in the resolver's order, without repeats."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:  # socket.gaierror: no such name, resolver failure
        raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_HTTPX_ERRORS: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.ProtocolError: httpx.ProtocolError,
}
"""httpcore's errors and their httpx equivalents, as ``httpx.HTTPTransport`` maps them."""


@contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for kind in type(exc).__mro__:  # the most specific mapping first
            mapped = _HTTPX_ERRORS.get(kind)
            if mapped is not None:
                raise mapped(str(exc)) from exc
        raise


class _ResponseBody(httpx.SyncByteStream):
    """httpcore's response stream, raising httpx's errors; closing it drops an unfinished
    connection (httpcore never returns a connection with unread body to its pool)."""

    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            with _as_httpx_errors():
                close()


class BoundedTransport(httpx.BaseTransport):
    """``httpx.HTTPTransport`` (HTTP/1.1, httpx's default limits and TLS context, no proxy)
    whose sockets honour the deadline made current by :func:`bounded_by`."""

    def __init__(self) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=100,  # httpx's DEFAULT_LIMITS
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_BoundedBackend(),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = self._pool.handle_request(core_request)
        if not isinstance(response.stream, Iterable):  # pragma: no cover - a sync pool
            raise TypeError("httpcore returned an async stream to a sync transport")
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseBody(response.stream),
            extensions=response.extensions,
        )

    def close(self) -> None:
        with _as_httpx_errors():
            self._pool.close()
