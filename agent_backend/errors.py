"""Errors of the agent-backend client, under :class:`cache.errors.AgentBackendError`::

    AgentBackendError
    ├── BackendTransportError        refused, reset, or broken HTTP: no usable answer
    ├── BackendTimeout               the call's total deadline passed (``timeout_s``, retries
    │                                included), or ``wait_run``'s did
    ├── WaitStopped                  ``wait_run`` gave up because its caller's ``stop`` was set
    ├── BackendValidationError       422 from the backend, or a 2xx answer that is not JSON
    │   │                            (content type, encoding, syntax) or fails the models
    │   └── BackendResponseTooLarge  an answer over the client's byte cap (nothing past the
    │                                cap was read; the connection was dropped)
    └── BackendHTTPError             any other non-2xx answer (``status_code``, ``detail``)
        └── BackendNotFound          404: no such run

Nothing else leaves the client: httpx, httpcore, h11, JSON and pydantic errors are all
translated (the original stays as ``__cause__``).

A :class:`BackendTimeout` or :class:`BackendTransportError` from ``create_run`` leaves it
unknown whether the run was created: send the same idempotency key again rather than a new one.
"""

from __future__ import annotations

from cache.errors import AgentBackendError

__all__ = [
    "AgentBackendError",
    "BackendHTTPError",
    "BackendNotFound",
    "BackendResponseTooLarge",
    "BackendTimeout",
    "BackendTransportError",
    "BackendValidationError",
    "WaitStopped",
]


class BackendTransportError(AgentBackendError):
    """The backend could not be reached, or the connection failed or broke HTTP mid-call."""


class WaitStopped(AgentBackendError):
    """``wait_run`` stopped polling because its caller asked it to (a worker shutting down);
    the run goes on on the backend."""


class BackendTimeout(AgentBackendError):
    """A call did not get a complete answer within its deadline, or a run was not terminal
    by ``wait_run``'s deadline."""


class BackendValidationError(AgentBackendError):
    """The backend refused the request body (422), or its answer does not fit the models."""

    def __init__(
        self, message: str, *, status_code: int | None = None, detail: object = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


class BackendResponseTooLarge(BackendValidationError):
    """The answer is larger than the client accepts (``limit`` bytes).

    A validation error because no valid answer can be that large: the cap is derived from
    the largest snapshot this deployment stores (see ``agent_backend.client.response_cap``).
    """

    def __init__(self, message: str, *, limit: int, status_code: int | None = None) -> None:
        super().__init__(message, status_code=status_code)
        self.limit = limit


class BackendHTTPError(AgentBackendError):
    """The backend answered with a non-2xx status (other than 422)."""

    def __init__(self, status_code: int, detail: object) -> None:
        super().__init__(f"agent backend answered HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class BackendNotFound(BackendHTTPError):
    """404: the backend does not know the run."""
