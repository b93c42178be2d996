"""Synchronous httpx client of the agent backend (DESIGN §7).

Retry policy:

* ``create_run`` (``POST /runs``) is never retried: the backend does not promise to dedupe, so
  a blind retry could start a second run. On a transport error or timeout the caller does not
  know whether the run exists; it may re-send with the same idempotency key.
* ``get_run`` is retried ``get_retries`` times on transport errors and HTTP timeouts, with a
  doubling backoff starting at ``retry_backoff_s``. ``cancel_run`` is retried the same way: the
  contract makes cancellation idempotent.
* HTTP errors (4xx/5xx) and invalid answers are never retried.

Every call has a timeout (``timeout_s``, per HTTP request). ``wait_run`` polls ``get_run``
until a terminal status and raises :class:`BackendTimeout` once its own deadline passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from cache.validate import check_id
from workers.backend_errors import (
    AgentBackendError,
    BackendHTTPError,
    BackendNotFound,
    BackendTimeout,
    BackendTransportError,
    BackendValidationError,
)
from workers.backend_models import (
    CancelRunRequest,
    CancelRunResponse,
    CreateRunRequest,
    CreateRunResponse,
    RunStatusResponse,
)

__all__ = [
    "AgentBackendClient",
    "AgentBackendError",
    "BackendHTTPError",
    "BackendNotFound",
    "BackendTimeout",
    "BackendTransportError",
    "BackendValidationError",
]

logger = logging.getLogger(__name__)

_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")

_RETRYABLE = (BackendTransportError, BackendTimeout)
_MIN_POLL_TIMEOUT_S = 0.05
"""Lower bound of one poll's HTTP timeout when ``wait_run``'s deadline is nearly spent."""
_FIRST_POLL_S = 0.01
"""First pause between polls; it doubles up to ``poll_interval_s``."""


class AgentBackendClient:
    """One ``httpx.Client`` talking to one agent backend; use it as a context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        get_retries: int = 3,
        retry_backoff_s: float = 0.05,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if get_retries < 0:
            raise ValueError(f"get_retries must not be negative, got {get_retries}")
        self._timeout_s = timeout_s
        self._get_retries = get_retries
        self._backoff_s = retry_backoff_s
        self._http = httpx.Client(
            base_url=base_url,
            timeout=timeout_s,
            transport=transport,
            headers={"accept": "application/json"},
        )

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

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
        response = self._send("POST", "/runs", body=request)
        return _decode(CreateRunResponse, response)

    def get_run(self, run_id: str) -> RunStatusResponse:
        """``GET /runs/{id}``, retried on transport errors; :class:`BackendNotFound` on 404."""
        return self._get_run(run_id, self._timeout_s)

    def wait_run(
        self, run_id: str, *, timeout_s: float, poll_interval_s: float = 0.2
    ) -> RunStatusResponse:
        """Poll until the run is terminal; :class:`BackendTimeout` once ``timeout_s`` passed.

        Polls start at ``_FIRST_POLL_S`` and double up to ``poll_interval_s``: short runs (a
        cleanup) answer within milliseconds, long ones are not polled needlessly often.
        """
        if timeout_s < 0 or poll_interval_s <= 0:
            raise ValueError("timeout_s must be >= 0 and poll_interval_s > 0")
        deadline = time.monotonic() + timeout_s
        interval = min(_FIRST_POLL_S, poll_interval_s)
        while True:
            remaining = deadline - time.monotonic()
            status = self._get_run(run_id, _poll_timeout(self._timeout_s, remaining))
            if status.terminal:
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendTimeout(f"run {run_id} still {status.status} after {timeout_s:.3f}s")
            time.sleep(min(interval, remaining))
            interval = min(interval * 2, poll_interval_s)

    def cancel_run(self, run_id: str, request: CancelRunRequest | None = None) -> CancelRunResponse:
        """``POST /runs/{id}/cancel`` (idempotent, so retried); 409 if the run already ended."""
        body = request if request is not None else CancelRunRequest()
        path = f"{_run_path(run_id)}/cancel"
        response = self._with_retries(lambda: self._send("POST", path, body=body))
        return _decode(CancelRunResponse, response)

    # ---------------------------------------------------------------------------- plumbing

    def _get_run(self, run_id: str, timeout_s: float) -> RunStatusResponse:
        path = _run_path(run_id)
        response = self._with_retries(lambda: self._send("GET", path, timeout_s=timeout_s))
        return _decode(RunStatusResponse, response)

    def _with_retries(self, call: Callable[[], _T]) -> _T:
        for attempt in range(self._get_retries):
            try:
                return call()
            except _RETRYABLE as exc:
                delay = self._backoff_s * 2**attempt
                logger.info("agent backend call failed (%s); retry in %.3fs", exc, delay)
                time.sleep(delay)
        return call()

    def _send(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | None = None,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        content = None if body is None else body.model_dump_json().encode()
        headers = {} if body is None else {"content-type": "application/json"}
        timeout = self._timeout_s if timeout_s is None else timeout_s
        try:
            response = self._http.request(
                method, path, content=content, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise BackendTimeout(f"{method} {path} timed out after {timeout:.3f}s") from exc
        except httpx.HTTPError as exc:
            raise BackendTransportError(f"{method} {path} failed: {exc!r}") from exc
        _raise_for_status(response)
        return response


def _run_path(run_id: str) -> str:
    return f"/runs/{quote(check_id('run_id', run_id), safe='')}"


def _poll_timeout(client_timeout_s: float, remaining_s: float) -> float:
    return min(client_timeout_s, max(remaining_s, _MIN_POLL_TIMEOUT_S))


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    detail = _detail(response)
    status = response.status_code
    if status == httpx.codes.NOT_FOUND:
        raise BackendNotFound(status, detail)
    if status == httpx.codes.UNPROCESSABLE_ENTITY:
        raise BackendValidationError(
            f"agent backend refused the request (422): {detail}", status_code=status, detail=detail
        )
    raise BackendHTTPError(status, detail)


def _detail(response: httpx.Response) -> object:
    """The ``detail`` of a JSON error body, else the body text."""
    try:
        body = response.json()
    except ValueError:
        return response.text
    return body.get("detail", body) if isinstance(body, dict) else body


def _decode(model: type[_M], response: httpx.Response) -> _M:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise BackendValidationError(
            f"agent backend answer is not a valid {model.__name__}: {exc}",
            status_code=response.status_code,
            detail=response.text,
        ) from exc
