"""A loopback fake agent backend: a real HTTP server for the demo and the tests (DESIGN §7).

It speaks the protocol of :mod:`agent_backend.models` and behaves like dify-agent where the
session lifecycle depends on it:

* ``POST /runs`` validates the body (422 if invalid) and answers ``202`` with status
  ``running``; the run finishes shortly after in a background timer (``finish_delay_s``,
  10 ms by default), so a client MUST wait for the terminal status.
* Entry checks fail the run (visible only through ``GET /runs/{id}``, like the real backend):
  snapshot layer names that differ from the composition's, in order (the name-order trap); a
  ``closed`` layer in the snapshot; a composition without a ``dify.plugin.llm`` layer unless it
  is a cleanup run (``on_exit.default == "delete"``).
* A run enters every layer (``new`` or ``suspended`` state from the snapshot), appends one
  message ``{"role": "assistant", "run": <run_id>, "n": <count>}`` to the ``messages`` of each
  ``pydantic_ai.history`` layer (not in cleanup runs), and exits each layer per ``on_exit``
  (``suspend`` → ``suspended``, ``delete`` → ``closed``). The resulting snapshot and output come
  back in :class:`RunStatusResponse` (our extension; the real backend sends them as events).
* Idempotency: a create with the ``idempotency_key`` of an earlier run that is running,
  paused or succeeded returns THAT run (``200``, nothing new is started). A failed or cancelled
  run releases its key, so a retry with the same key (a cleanup attempt) starts a new run;
  with ``dedupe_failed=True`` it keeps it, as a backend that dedupes every key would.
* ``POST /runs/{id}/cancel`` cancels a running run at once (the real backend records an intent
  and may still say ``running`` for a while); cancelling a cancelled run is a no-op; 409 once
  the run succeeded, failed or paused. ``GET /runs`` lists every run; ``GET /healthz`` → ok.

Behaviours: ``succeed`` (default), ``fail`` or ``fail:<error>``, ``pause``, ``cancel``,
``stall`` (running until cancelled), ``slow:<ms>``, ``human_input`` (paused with a deferred
``ask_human`` tool call). A request chooses one with ``metadata["fake_behaviour"]``; otherwise
the first matching programmatic rule (:meth:`FakeAgentBackend.set_behaviour`, :meth:`script`,
:meth:`fail_next_cleanups`) applies, else the default. Entry-check failures beat any behaviour.

Standalone: ``python -m agent_sessions.testing.fake_backend --port 8900`` prints its URL and serves
until interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self, TypeVar, cast
from urllib.parse import unquote, urlsplit

import msgspec

from agent_backend.models import (
    CancelRunRequest,
    CancelRunResponse,
    CreateRunRequest,
    CreateRunResponse,
    JsonValue,
    decode_json,
    encode_json,
)
from agent_sessions.testing.fake_agent import (
    BEHAVIOUR_METADATA_KEY,
    DEFAULT_FINISH_DELAY_S,
    Behaviour,
    Rule,
    entry_error,
    is_cleanup_request,
)
from agent_sessions.testing.fake_runs import FakeRun, RunConflict, RunListResponse, RunStore

__all__ = [
    "BEHAVIOUR_METADATA_KEY",
    "Behaviour",
    "FakeAgentBackend",
    "FakeRun",
    "RunListResponse",
    "entry_error",
    "is_cleanup_request",
    "main",
]

logger = logging.getLogger(__name__)

_M = TypeVar("_M", bound=msgspec.Struct)


# ------------------------------------------------------------------------------ HTTP layer

_RUN_PATH = re.compile(r"^/runs/(?P<run_id>[^/]+)$")
_CANCEL_PATH = re.compile(r"^/runs/(?P<run_id>[^/]+)/cancel$")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: RunStore) -> None:
        super().__init__(address, _Handler)
        self.store = store


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to small methods; one connection per request (HTTP/1.0)."""

    server_version = "FakeAgentBackend/1.0"

    @property
    def _store(self) -> RunStore:
        return cast(_Server, self.server).store

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._reply_json(HTTPStatus.OK, {"status": "ok"})
        elif path == "/runs":
            self._list_runs()
        elif match := _RUN_PATH.match(path):
            self._get_run(unquote(match["run_id"]))
        else:
            self._not_found(f"no route for GET {path}")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path == "/runs":
            self._create_run()
        elif match := _CANCEL_PATH.match(path):
            self._cancel_run(unquote(match["run_id"]))
        else:
            self._not_found(f"no route for POST {path}")

    def _create_run(self) -> None:
        request = self._read_model(CreateRunRequest)
        if request is None:
            return
        try:
            run, created = self._store.create(request)
        except ValueError as exc:
            self._reply_json(HTTPStatus.UNPROCESSABLE_ENTITY, {"detail": str(exc)})
            return
        status = HTTPStatus.ACCEPTED if created else HTTPStatus.OK
        self._reply_model(status, CreateRunResponse(run_id=run.run_id, status=run.status))

    def _get_run(self, run_id: str) -> None:
        run = self._store.get(run_id)
        if run is None:
            self._not_found(f"run {run_id!r} not found")
        else:
            self._reply_model(HTTPStatus.OK, run.to_status())

    def _cancel_run(self, run_id: str) -> None:
        request = self._read_model(CancelRunRequest, empty_body=b"{}")
        if request is None:
            return
        try:
            run = self._store.cancel(run_id, request)
        except KeyError:
            self._not_found(f"run {run_id!r} not found")
        except RunConflict as exc:
            self._reply_json(HTTPStatus.CONFLICT, {"detail": str(exc)})
        else:
            self._reply_model(HTTPStatus.OK, CancelRunResponse(run_id=run_id, status=run.status))

    def _list_runs(self) -> None:
        runs = [run.to_status() for run in self._store.all()]
        self._reply_model(HTTPStatus.OK, RunListResponse(runs=runs))

    def _read_model(self, model: type[_M], *, empty_body: bytes = b"") -> _M | None:
        """The body parsed as ``model``, or ``None`` after answering 422."""
        body = self._read_body() or empty_body
        try:
            return decode_json(model, body)
        except (msgspec.DecodeError, RecursionError) as exc:
            self._reply_json(HTTPStatus.UNPROCESSABLE_ENTITY, {"detail": str(exc)})
            return None

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    def _not_found(self, detail: str) -> None:
        self._reply_json(HTTPStatus.NOT_FOUND, {"detail": detail})

    def _reply_model(self, status: HTTPStatus, model: msgspec.Struct) -> None:
        self._reply_bytes(status, encode_json(model))

    def _reply_json(self, status: HTTPStatus, payload: JsonValue) -> None:
        self._reply_bytes(status, json.dumps(payload).encode())

    def _reply_bytes(self, status: HTTPStatus, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)


# -------------------------------------------------------------------------------- facade


class FakeAgentBackend:
    """The fake backend: ``with FakeAgentBackend() as fake: ... fake.url ...``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        finish_delay_s: float = DEFAULT_FINISH_DELAY_S,
        dedupe_failed: bool = False,
    ) -> None:
        self._address = (host, port)
        self._store = RunStore(finish_delay_s, dedupe_failed=dedupe_failed)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server (``RuntimeError`` when stopped)."""
        if self._server is None:
            raise RuntimeError("the fake agent backend is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        """Bind and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("the fake agent backend is already running")
        self._server = _Server(self._address, self._store)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-agent-backend:{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Bind and serve in the calling thread until interrupted (the standalone entry)."""
        self._server = _Server(self._address, self._store)
        try:
            if on_ready is not None:
                on_ready(self.url)
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self._close()

    def stop(self) -> None:
        """Stop serving, close the socket and drop pending completions (idempotent)."""
        if self._server is None:
            return
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join()
        self._close()

    def _close(self) -> None:
        if self._server is not None:
            self._server.server_close()
        self._server = None
        self._thread = None
        self._store.cancel_timers()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --------------------------------------------------------------------- test controls

    def set_behaviour(
        self,
        behaviour: str,
        *,
        match_idempotency_prefix: str | None = None,
        times: int | None = None,
    ) -> None:
        """Without filters: the new default. With a prefix or ``times``: an ordered rule."""
        parsed = Behaviour.parse(behaviour)
        if match_idempotency_prefix is None and times is None:
            self._store.set_default(parsed)
            return
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        self._store.add_rule(Rule(parsed, match_idempotency_prefix, times))

    def script(self, *behaviours: str, match_idempotency_prefix: str | None = None) -> None:
        """The next matching runs behave as listed, one each, in order."""
        for behaviour in behaviours:
            self.set_behaviour(
                behaviour, match_idempotency_prefix=match_idempotency_prefix, times=1
            )

    def fail_next_cleanups(self, n: int = 1, *, error: str | None = None) -> None:
        """The next ``n`` cleanup runs fail (with ``error`` or a scripted message)."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        failure = Behaviour("fail", error=error)
        self._store.add_rule(Rule(failure, remaining=n, cleanup_only=True))

    def clear_behaviours(self) -> None:
        """Forget every rule; the default goes back to ``succeed``."""
        self._store.clear_behaviours()

    def reset(self) -> None:
        """Forget every run and every behaviour."""
        self._store.clear_runs()
        self._store.clear_behaviours()

    def runs(self) -> list[FakeRun]:
        """Every run, in creation order (immutable records, including the full request)."""
        return self._store.all()

    def run(self, run_id: str) -> FakeRun:
        """One run (``KeyError`` if unknown)."""
        run = self._store.get(run_id)
        if run is None:
            raise KeyError(run_id)
        return run


# ---------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agent_sessions.testing.fake_backend [--host H] [--port N]
    [--finish-delay-ms MS]``."""
    args = _parse_args(argv)
    # A process started in the background by a non-interactive shell inherits SIGINT
    # ignored, and Python then installs no handler: "until interrupted" must hold anyway.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fake = FakeAgentBackend(args.host, args.port, finish_delay_s=args.finish_delay_ms / 1000)
    try:
        fake.serve_forever(on_ready=_announce)
    except KeyboardInterrupt:
        logger.info("fake agent backend stopped")
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m agent_sessions.testing.fake_backend",
        description="Serve the loopback fake agent backend until interrupted.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--finish-delay-ms", type=float, default=DEFAULT_FINISH_DELAY_S * 1000)
    return parser.parse_args(argv)


def _announce(url: str) -> None:
    sys.stdout.write(f"fake agent backend listening on {url}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
