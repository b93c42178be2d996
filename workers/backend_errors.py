"""Errors of the agent-backend client, under :class:`cache.errors.AgentBackendError`::

    AgentBackendError
    ├── BackendTransportError   connect / read / protocol failure: no usable answer
    ├── BackendTimeout          an HTTP timeout, or ``wait_run``'s deadline passed
    ├── BackendValidationError  422 from the backend, or an answer that fails the models
    └── BackendHTTPError        any other non-2xx answer (``status_code``, ``detail``)
        └── BackendNotFound     404: no such run

A :class:`BackendTimeout` or :class:`BackendTransportError` from ``create_run`` leaves it
unknown whether the run was created: send the same idempotency key again rather than a new one.
"""

from __future__ import annotations

from cache.errors import AgentBackendError

__all__ = [
    "AgentBackendError",
    "BackendHTTPError",
    "BackendNotFound",
    "BackendTimeout",
    "BackendTransportError",
    "BackendValidationError",
]


class BackendTransportError(AgentBackendError):
    """The backend could not be reached, or the connection failed mid-call."""


class BackendTimeout(AgentBackendError):
    """An HTTP call timed out, or a run was not terminal by ``wait_run``'s deadline."""


class BackendValidationError(AgentBackendError):
    """The backend refused the request body (422), or its answer does not fit the models."""

    def __init__(
        self, message: str, *, status_code: int | None = None, detail: object = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


class BackendHTTPError(AgentBackendError):
    """The backend answered with a non-2xx status (other than 422)."""

    def __init__(self, status_code: int, detail: object) -> None:
        super().__init__(f"agent backend answered HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class BackendNotFound(BackendHTTPError):
    """404: the backend does not know the run."""
