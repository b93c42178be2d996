"""Reading one agent-backend answer within a byte cap, and turning it into a model or a
typed error.

Every answer is read streamed (``send(..., stream=True)``) and raw: the client asks for
``accept-encoding: identity`` and refuses a content-encoded 2xx answer, so that a small
compressed body cannot inflate past the cap while it is decoded. A declared
``Content-Length`` over the cap is refused before any of the body is read; a body without
one (chunked, or delimited by the connection's end) is refused at the chunk that would cross
the cap. Either way at most ``cap`` bytes plus one network read (64 KiB) are held, and the
caller closes the response unread, which drops the connection instead of draining it.

Error answers (not 2xx) keep at most :data:`ERROR_BODY_BYTES` of their body as ``detail``:
their status is the information, so an oversized error page is truncated, not refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import httpx
import msgspec

from agent_backend.errors import (
    BackendHTTPError,
    BackendNotFound,
    BackendResponseTooLarge,
    BackendTimeout,
    BackendValidationError,
)
from agent_backend.http import Deadline
from agent_backend.models import decode_json

__all__ = ["ERROR_BODY_BYTES", "Answer", "decode", "raise_for_status", "read_answer"]

_M = TypeVar("_M", bound=msgspec.Struct)

ERROR_BODY_BYTES = 64 * 1024
"""How much of a non-2xx body is kept for the error's ``detail``."""
_PREVIEW_CHARS = 2000
"""How much of an unusable body an error message or ``detail`` quotes."""


@dataclass(frozen=True)
class Answer:
    """A complete answer: its status and its whole (capped) body."""

    status_code: int
    content: bytes


def read_answer(response: httpx.Response, deadline: Deadline, cap: int) -> Answer:
    """The body of a streamed ``response``, checked and read within ``cap`` and ``deadline``."""
    if not response.is_success:
        limit = min(cap, ERROR_BODY_BYTES)
        return Answer(response.status_code, _read_body(response, deadline, limit, truncate=True))
    _check_representation(response)
    _check_declared_length(response, cap)
    return Answer(response.status_code, _read_body(response, deadline, cap, truncate=False))


def _read_body(
    response: httpx.Response, deadline: Deadline, limit: int, *, truncate: bool
) -> bytes:
    """Up to ``limit`` bytes; past it the rest is cut off (``truncate``) or refused.

    The deadline is checked between chunks too, so a transport without
    :class:`~agent_backend.http.BoundedTransport` (a mock) is still bounded here.
    """
    body = bytearray()
    for chunk in _raw_chunks(response):
        if len(body) + len(chunk) > limit:
            if not truncate:
                raise _too_large(response, limit, "its body grew past it")
            body += chunk[: limit - len(body)]
            break
        body += chunk
        if deadline.expired():
            raise BackendTimeout(
                f"agent backend answer still incomplete after {deadline.budget_s:.3f}s "
                f"({len(body)} bytes read)"
            )
    return bytes(body)


def _raw_chunks(response: httpx.Response) -> Iterator[bytes]:
    """The body as received, never content-decoded (decoding could inflate a chunk far past
    the cap). A response built in memory (a mock transport's) was read when it was built."""
    if response.is_stream_consumed:
        yield response.content
    else:
        yield from response.iter_raw()


def _check_representation(response: httpx.Response) -> None:
    """A 2xx answer must be plain JSON: anything else cannot be a valid model anyway."""
    status = response.status_code
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise BackendValidationError(
            f"agent backend answer is {encoding}-encoded; the client asks for identity",
            status_code=status,
        )
    media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not _is_json(media_type):
        raise BackendValidationError(
            f"agent backend answered {media_type or 'without a content type'}, not JSON",
            status_code=status,
            detail=media_type or None,
        )


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def _check_declared_length(response: httpx.Response, cap: int) -> None:
    declared = response.headers.get("content-length")
    try:
        length = int(declared) if declared is not None else 0
    except ValueError:  # h11 refuses a malformed length; the streamed read still caps a mock
        return
    if length > cap:
        raise _too_large(response, cap, f"it declares {length} bytes")


def _too_large(response: httpx.Response, cap: int, why: str) -> BackendResponseTooLarge:
    return BackendResponseTooLarge(
        f"agent backend answer refused: over the {cap}-byte cap ({why})",
        limit=cap,
        status_code=response.status_code,
    )


def raise_for_status(answer: Answer) -> None:
    """The typed error of a non-2xx answer: 404, 422, or any other."""
    status = answer.status_code
    if 200 <= status < 300:
        return
    detail = _error_detail(answer.content)
    if status == httpx.codes.NOT_FOUND:
        raise BackendNotFound(status, detail)
    if status == httpx.codes.UNPROCESSABLE_ENTITY:
        raise BackendValidationError(
            f"agent backend refused the request (422): {detail}", status_code=status, detail=detail
        )
    raise BackendHTTPError(status, detail)


def _error_detail(content: bytes) -> object:
    """The ``detail`` of a JSON error body, else (a preview of) the body text."""
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested absurdly deep
        return _preview(content)
    return body.get("detail", body) if isinstance(body, dict) else body


def _preview(content: bytes) -> str:
    text = content[:_PREVIEW_CHARS].decode("utf-8", errors="replace")
    return text if len(content) <= _PREVIEW_CHARS else f"{text}... ({len(content)} bytes)"


def decode(model: type[_M], answer: Answer, decoder: Callable[[bytes], _M] | None = None) -> _M:
    """``answer`` as ``model`` (through ``decoder`` if given); :class:`BackendValidationError`
    if it is not one, including JSON nested past the interpreter's recursion limit."""
    try:
        if decoder is not None:
            return decoder(answer.content)
        return decode_json(model, answer.content)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BackendValidationError(
            f"agent backend answer is not a valid {model.__name__}: {exc}",
            status_code=answer.status_code,
            detail=_preview(answer.content),
        ) from exc
