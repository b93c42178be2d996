"""What a worker lets in: only this project's jobs, with arguments of the right shape, in
payloads of a bounded size.

Whoever can write to the queue's Redis can push a JSON job naming any importable function
(``os.system``), a callback or a webhook, absurd arguments, or a zlib stream that inflates
to hundreds of megabytes (RQ decompresses a job's payload when it fetches the job, before
any worker code sees it). :class:`BoundedJob` refuses a payload over
:data:`MAX_PAYLOAD_BYTES`, stored or inflated, without inflating more than that, and
:func:`refusal` says why any other job is not one of ours. ``SessionWorker`` deletes a
refused job unrun, logs why and counts it (``stats``: ``foreign_jobs_refused``,
``jobs_refused_bad_arguments``, ``jobs_refused_oversized``).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any, Final

from rq.job import Job

from cache.errors import InvalidInput
from cache.records import OwnerType, SessionKey
from workers.cleanup import CLEANUP_JOB
from workers.queues import FLUSH_JOB

MAX_PAYLOAD_BYTES: Final = 64 * 1024
"""A job's payload (function name and arguments), stored or inflated. Ours take well under
2 KiB: shard numbers, or five IDs of at most 255 characters."""
REFUSED_PAYLOAD: Final = b'["<refused: payload over its bound>", null, [], {}]'
"""What an oversized job's payload becomes: a function that is not ours, so it is refused."""
_OWNER_TYPES: Final = frozenset(owner.value for owner in OwnerType)


class BoundedJob(Job):
    """An RQ job whose stored payload is checked before it is inflated."""

    oversized: str | None = None
    """Why the payload was refused, when it was."""

    def restore(self, raw_data: Mapping[bytes, Any]) -> Any:
        why = oversized(raw_data.get(b"data"))
        if why is not None:
            raw_data = {**raw_data, b"data": REFUSED_PAYLOAD}
        restored = super().restore(raw_data)
        self.oversized = why
        return restored


def oversized(data: bytes | None) -> str | None:
    """Why a stored payload is too large, or ``None``; inflates at most the bound."""
    if data is None:
        return None
    if len(data) > MAX_PAYLOAD_BYTES:
        return f"its stored payload is {len(data)} bytes, over {MAX_PAYLOAD_BYTES}"
    inflater = zlib.decompressobj()
    try:
        inflater.decompress(data, MAX_PAYLOAD_BYTES)
    except zlib.error:
        return None  # not compressed: RQ reads it as it is, and it is within the bound
    if inflater.unconsumed_tail:
        return f"its payload inflates to more than {MAX_PAYLOAD_BYTES} bytes"
    return None


def refusal(job: Job, queues: frozenset[str], shards: int) -> tuple[str, str] | None:
    """``(counter, why)`` if ``job`` is not one of ours, else ``None``: a payload over its
    bound, another function, a callback or webhook, a queue of another prefix, or arguments
    a job of ours would never carry."""
    oversize = getattr(job, "oversized", None)
    if oversize:
        return "jobs_refused_oversized", str(oversize)
    if job.func_name not in (FLUSH_JOB, CLEANUP_JOB) or job.instance is not None:
        return "foreign_jobs_refused", f"function {job.func_name!r} is not a job of this project"
    hooks = ("_success_callback_name", "_failure_callback_name", "_stopped_callback_name")
    if any(getattr(job, hook, None) for hook in hooks) or job.webhooks:
        return "foreign_jobs_refused", "it carries a callback or a webhook"
    if job.origin not in queues:
        return "foreign_jobs_refused", f"it came from queue {job.origin!r}, not this prefix's"
    why = _bad_arguments(job.func_name, list(job.args), dict(job.kwargs), shards)
    return None if why is None else ("jobs_refused_bad_arguments", why)


def _bad_arguments(
    function: str, args: list[Any], kwargs: dict[str, Any], shards: int
) -> str | None:
    if kwargs:
        return f"keyword arguments {sorted(kwargs)!r}"
    if function == FLUSH_JOB:
        return _bad_flush(args, shards)
    return _bad_cleanup(args)


def _bad_flush(args: list[Any], shards: int) -> str | None:
    """``flush_job(shards, urgent=False)``: a shard of this key space or a list of distinct
    ones (at most all of them), a boolean."""
    if not 1 <= len(args) <= 2:
        return f"flush_job takes 1 or 2 arguments, got {len(args)}"
    listed = args[0] if type(args[0]) is list else [args[0]]
    if not listed or len(listed) > shards or len(set(map(repr, listed))) != len(listed):
        return f"shards {args[0]!r} is not a non-empty list of distinct shards"
    for shard in listed:
        if type(shard) is not int or not 0 <= shard < shards:
            return f"shard {shard!r} is not one of 0..{shards - 1}"
    if len(args) == 2 and type(args[1]) is not bool:
        return f"urgent {args[1]!r} is not a boolean"
    return None


def _bad_cleanup(args: list[Any]) -> str | None:
    """``cleanup_job(*key.parts(), owner_type)``: five valid IDs and an owner type."""
    if len(args) not in (5, 6):
        return f"cleanup_job takes 5 or 6 arguments, got {len(args)}"
    owner = args[5] if len(args) == 6 else OwnerType.WORKFLOW_RUN.value
    if owner not in _OWNER_TYPES:
        return f"owner type {owner!r} is not one of {sorted(_OWNER_TYPES)}"
    if not all(isinstance(part, str) for part in args[:5]):
        return "a session key part is not a string"
    try:
        SessionKey.of_parts(owner, *args[:5])
    except InvalidInput as exc:
        return f"not a session key: {exc}"
    return None
