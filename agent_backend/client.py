"""Synchronous httpx client of the agent backend (DESIGN §7).

Deadlines: every call has one total deadline, ``timeout_s`` from its start, that bounds all of
it: connecting, sending, waiting for the status line, reading the body, every retry and every
backoff sleep. A server that never answers, stalls after its headers, trickles bytes or
resets the connection cannot hold a call past it; on expiry the call raises
:class:`BackendTimeout`. (httpx's own timeouts bound one socket operation each, so a trickle
never trips them; :mod:`agent_backend.http` explains how the deadline reaches every socket
operation.) ``wait_run``'s ``timeout_s`` is likewise one deadline over all its polls, retries
and sleeps: each poll gets the sooner of its own ``timeout_s`` and the wait's deadline.

Size: every answer is read streamed and refused past ``max_response_bytes``
(:class:`BackendResponseTooLarge`, the connection dropped); see :func:`response_cap` for the
size a deployment should allow and :mod:`agent_backend.answer` for how it is enforced.

Retry policy:

* ``create_run`` (``POST /runs``) is never retried: the backend does not promise to dedupe, so
  a blind retry could start a second run. On a transport error or timeout the caller does not
  know whether the run exists; it may re-send with the same idempotency key.
* ``get_run`` is retried up to ``get_retries`` times on transport errors and timeouts, with a
  doubling backoff starting at ``retry_backoff_s``, as long as the backoff still leaves time
  before the call's deadline (a timed-out attempt has used it up, so it is not retried).
  ``cancel_run`` is retried the same way: the contract makes cancellation idempotent.
* HTTP errors (4xx/5xx) and invalid or oversized answers are never retried.

Every failure is one of the typed errors of :mod:`agent_backend.errors`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from agent_backend.answer import Answer, decode, raise_for_status, read_answer
from agent_backend.errors import (
    AgentBackendError,
    BackendHTTPError,
    BackendNotFound,
    BackendResponseTooLarge,
    BackendTimeout,
    BackendTransportError,
    BackendValidationError,
    WaitStopped,
)
from agent_backend.http import BoundedTransport, Deadline, bounded_by
from agent_backend.models import (
    CancelRunRequest,
    CancelRunResponse,
    CreateRunRequest,
    CreateRunResponse,
    RunStatusResponse,
    decode_status,
    encode_json,
)
from cache.errors import InvalidInput
from cache.settings import MiB
from cache.validate import check_id

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "AgentBackendClient",
    "AgentBackendError",
    "BackendHTTPError",
    "BackendNotFound",
    "BackendResponseTooLarge",
    "BackendTimeout",
    "BackendTransportError",
    "BackendValidationError",
    "WaitStopped",
    "response_cap",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_RETRYABLE = (BackendTransportError, BackendTimeout)
_FIRST_POLL_S = 0.01
"""First pause between polls; it doubles up to ``poll_interval_s``."""
_MIN_ATTEMPT_S = 0.01
"""A retry is not worth starting with less time than this left before the deadline."""


def response_cap(max_snapshot_bytes: int) -> int:
    """The largest answer worth reading when snapshots are limited to ``max_snapshot_bytes``.

    ``4 * max_snapshot_bytes + 1 MiB``. The limit applies to a snapshot's msgpack encoding;
    the backend sends it as JSON, which is larger: about 1x for ASCII text (chat history),
    2-3x for non-ASCII text escaped as ``\\uXXXX`` (Python's ``json`` default), 2-4x for
    arrays of numbers. 4x covers all of those; only degenerate content (runs of ``null`` or
    control characters, 6x) could exceed it, and such a snapshot is refused either way. The
    extra MiB is the rest of the answer (output, error, tool call) and keeps small snapshot
    limits practical.
    """
    if max_snapshot_bytes < 0:
        raise ValueError(f"max_snapshot_bytes must not be negative, got {max_snapshot_bytes}")
    return 4 * max_snapshot_bytes + MiB


DEFAULT_MAX_RESPONSE_BYTES = response_cap(4 * MiB)
"""The cap for ``Settings``' default ``max_snapshot_bytes`` (4 MiB): 17 MiB."""


class AgentBackendClient:
    """One ``httpx.Client`` talking to one agent backend; use it as a context manager.

    ``timeout_s`` is each call's total deadline; ``max_response_bytes`` the largest answer
    read (pass :func:`response_cap` of the deployment's snapshot limit). ``transport``
    replaces :class:`~agent_backend.http.BoundedTransport` (tests); the deadline is then
    enforced through httpx's timeouts and between body chunks only.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        get_retries: int = 3,
        retry_backoff_s: float = 0.05,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if get_retries < 0:
            raise ValueError(f"get_retries must not be negative, got {get_retries}")
        if max_response_bytes <= 0:
            raise ValueError(f"max_response_bytes must be positive, got {max_response_bytes}")
        self._timeout_s = timeout_s
        self._get_retries = get_retries
        self._backoff_s = retry_backoff_s
        self._max_response_bytes = max_response_bytes
        self._http = httpx.Client(
            base_url=base_url,
            timeout=timeout_s,
            transport=transport if transport is not None else BoundedTransport(),
            headers={"accept": "application/json", "accept-encoding": "identity"},
        )

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    @property
    def max_response_bytes(self) -> int:
        return self._max_response_bytes

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------------------ calls

    def create_run(self, request: CreateRunRequest) -> CreateRunResponse:
        """``POST /runs``; never retried. Validation of the run itself happens later."""
        answer = self._send("POST", "/runs", Deadline.after(self._timeout_s), body=request)
        return decode(CreateRunResponse, answer)

    def get_run(self, run_id: str) -> RunStatusResponse:
        """``GET /runs/{id}``, retried on transport errors; :class:`BackendNotFound` on 404."""
        return self._get_run(run_id, Deadline.after(self._timeout_s))

    def wait_run(
        self,
        run_id: str,
        *,
        timeout_s: float,
        poll_interval_s: float = 0.2,
        stop: threading.Event | None = None,
    ) -> RunStatusResponse:
        """Poll until the run is terminal; :class:`BackendTimeout` once ``timeout_s`` passed,
        :class:`WaitStopped` as soon as ``stop`` is set (between polls).

        Polls start at ``_FIRST_POLL_S`` and double up to ``poll_interval_s``: short runs (a
        cleanup) answer within milliseconds, long ones are not polled needlessly often. No
        poll, retry or sleep runs past the deadline.
        """
        if timeout_s < 0 or poll_interval_s <= 0:
            raise ValueError("timeout_s must be >= 0 and poll_interval_s > 0")
        wait = Deadline.after(timeout_s)
        interval = min(_FIRST_POLL_S, poll_interval_s)
        last: RunStatusResponse | None = None
        while True:
            last = self._poll(run_id, wait, last)
            if last.terminal:
                return last
            if wait.expired():
                raise BackendTimeout(f"run {run_id} still {last.status} after {timeout_s:.3f}s")
            if stop is None:
                wait.sleep(interval)
            elif stop.wait(max(0.0, min(interval, wait.remaining()))):
                raise WaitStopped(f"stopped waiting for run {run_id} (still {last.status})")
            interval = min(interval * 2, poll_interval_s)

    def cancel_run(self, run_id: str, request: CancelRunRequest | None = None) -> CancelRunResponse:
        """``POST /runs/{id}/cancel`` (idempotent, so retried); 409 if the run already ended."""
        body = request if request is not None else CancelRunRequest()
        path = f"{_run_path(run_id)}/cancel"
        deadline = Deadline.after(self._timeout_s)
        answer = self._with_retries(lambda: self._send("POST", path, deadline, body=body), deadline)
        return decode(CancelRunResponse, answer)

    # ---------------------------------------------------------------------------- plumbing

    def _poll(
        self, run_id: str, wait: Deadline, last: RunStatusResponse | None
    ) -> RunStatusResponse:
        """One poll of ``wait_run``, ending by the wait's deadline; a poll cut short by that
        deadline reports the run's last known status."""
        try:
            return self._get_run(run_id, wait.sooner(self._timeout_s))
        except BackendTimeout as exc:
            if last is None or not wait.expired():
                raise
            raise BackendTimeout(
                f"run {run_id} still {last.status} after {wait.budget_s:.3f}s"
            ) from exc

    def _get_run(self, run_id: str, deadline: Deadline) -> RunStatusResponse:
        path = _run_path(run_id)
        answer = self._with_retries(lambda: self._send("GET", path, deadline), deadline)
        return decode(RunStatusResponse, answer, decode_status)

    def _with_retries(self, call: Callable[[], _T], deadline: Deadline) -> _T:
        """``call``, retried on transport errors and timeouts while the backoff fits in the
        time left before ``deadline``."""
        for attempt in range(self._get_retries):
            try:
                return call()
            except _RETRYABLE as exc:
                delay = self._backoff_s * 2**attempt
                if deadline.remaining() - delay < _MIN_ATTEMPT_S:
                    raise
                logger.info("agent backend call failed (%s); retry in %.3fs", exc, delay)
                time.sleep(delay)
        return call()

    def _send(
        self, method: str, path: str, deadline: Deadline, *, body: msgspec.Struct | None = None
    ) -> Answer:
        """One HTTP exchange, over by ``deadline``: the checked answer, or a typed error."""
        remaining = deadline.remaining()
        if remaining <= 0:
            raise BackendTimeout(f"{method} {path}: the {deadline.budget_s:.3f}s deadline passed")
        request = self._http.build_request(
            method,
            path,
            content=None if body is None else _body(method, path, body),
            headers={} if body is None else {"content-type": "application/json"},
            timeout=remaining,
        )
        try:
            with bounded_by(deadline):
                response = self._http.send(request, stream=True)
                try:
                    answer = read_answer(response, deadline, self._max_response_bytes)
                finally:
                    response.close()
        except httpx.TimeoutException as exc:
            raise BackendTimeout(
                f"{method} {path}: no complete answer within {deadline.budget_s:.3f}s"
            ) from exc
        except httpx.HTTPError as exc:
            raise BackendTransportError(f"{method} {path} failed: {exc!r}") from exc
        raise_for_status(answer)
        return answer


def _body(method: str, path: str, body: msgspec.Struct) -> bytes:
    """The JSON of a request body; text JSON cannot hold (a lone surrogate) is refused."""
    try:
        return encode_json(body)
    except (msgspec.EncodeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidInput(f"{method} {path}: the request cannot be sent as JSON: {exc}") from exc


def _run_path(run_id: str) -> str:
    return f"/runs/{quote(check_id('run_id', run_id), safe='')}"
