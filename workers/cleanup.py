"""End-of-workflow cleanup of one session on the agent backend (DESIGN §6).

The backend keeps a suspended session's layer resources until somebody sends a run that
deletes them. For a ``cleaning`` session we replay its stored layer specs as the composition,
send the snapshot aligned to the spec names (the backend refuses a snapshot whose layer names
differ from the composition's, in order) with ``on_exit.default = delete``, and wait for the
run's terminal status: creation is accepted before validation happens, so only a
``succeeded`` status proves the cleanup. Only then is the session marked ``cleaned``.

A backend may or may not free an idempotency key when its run fails. So each attempt's run
is remembered on the session (``cleanup_run_id``, ``cleanup_attempt``): the next attempt asks
that run first (it may still be running, or have succeeded after all) and creates a new run,
under a derived key (``...:retry-n``), only once the remembered one failed.

Each session has its own RQ job and its own retries, queued with a fresh id and a per-session
pending marker (like flushes: ``workers.queues``). The last attempt marks the session
``cleaned`` with the error kept, so a broken backend never leaves a session resumable; a job
lost altogether is requested again by the reconciler once its marker expires.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass

import redis
from rq import Queue, Retry

from cache.records import OwnerType, SessionKey, SessionStatus, StoredSession
from cache.store import RedisSessionCache
from persistence.repository import SessionRepository
from workers.backend import AgentBackendClient, BackendNotFound
from workers.backend_models import (
    PURPOSES,
    CreateRunRequest,
    CreateRunResponse,
    LayerExitSignals,
    RunStatusResponse,
    composition_from_specs,
)
from workers.queues import claim_marker, translate_queue_errors
from workers.readthrough import load_through

log = logging.getLogger(__name__)

CLEANUP_JOB = "workers.jobs.cleanup_job"
CLEANUP_INTERVALS_S = [2, 5, 15, 30, 60, 120]
CLEANUP_JOB_TIMEOUT_S = 300
CLEANUP_PENDING_TTL_S = 900
"""How long a requested cleanup counts as live without news; each attempt renews it."""
_FAILED = frozenset({"failed", "cancelled", "paused"})
"""Terminal states other than success: the run's key may be kept by the backend."""


class CleanupFailed(Exception):
    """The backend did not confirm the cleanup; RQ retries the job."""


@dataclass(frozen=True, slots=True)
class CleanupResult:
    """What one attempt did: ``cleaned``, ``cleaned_locally``, ``skipped`` or ``gave_up``."""

    outcome: str
    cleanup_run_id: str | None = None
    error: str | None = None


def cleanup_idempotency_key(key: SessionKey, attempt: int = 0, *, retirement: str = "") -> str:
    """Stable per session, retirement and attempt; ``attempt`` n >= 1 appends ``:retry-n``.

    A workflow run's: ``<run>:<node>:<binding>:<agent>:agent-session-cleanup`` (DESIGN §6
    leaves ``agent_id`` out; two agents on one node and binding would then share a key, and
    the backend would answer the second cleanup with the first one's run); it is cleaned up
    once, at the run's end. A conversation's session can be retired again and again (idle,
    back to a config, idle again): ``conversation:<conversation>:<binding>:<agent>:<config>:
    <retirement>:agent-session-cleanup``, where ``retirement`` (:func:`retirement_of`) names
    this retirement, so a deduplicating backend never answers it with an earlier one's run.
    """
    if key.owner_type is OwnerType.CONVERSATION:
        ids = f"conversation:{':'.join(key.parts()[1:])}:{retirement or '-'}"
    else:
        ids = f"{key.workflow_run_id}:{key.node_id}:{key.binding_id}:{key.agent_id}"
    base = f"{ids}:agent-session-cleanup"
    return f"{base}:retry-{attempt}" if attempt else base


def retirement_of(session: StoredSession) -> str:
    """Which retirement of a ``cleaning`` session this is: its lineage's head and the version
    it went to ``cleaning`` at (no cleanup attempt moves it; a fill from Postgres keeps it).
    Of a session its cleanup marked ``cleaned``: the version before that mark."""
    version = session.version - (session.status is SessionStatus.CLEANED)
    return f"{(session.lineage or '-')[:8]}.v{version}"


def cleanup_request(session: StoredSession, attempt: int = 0) -> CreateRunRequest:
    """The run that deletes the session's layers: specs replayed, snapshot aligned to them."""
    key, data = session.key, session.data
    names = [spec.name for spec in session.layer_specs]
    owner: dict[str, object]
    if key.owner_type is OwnerType.CONVERSATION:
        owner = {"conversation_id": key.owner_id}
    else:
        owner = {
            "workflow_id": data.workflow_id,
            "workflow_run_id": key.workflow_run_id,
            "node_id": key.node_id,
            "node_execution_id": data.node_execution_id,
        }
    return CreateRunRequest(
        composition=composition_from_specs(session.layer_specs),
        purpose=PURPOSES[key.owner_type],
        idempotency_key=cleanup_idempotency_key(key, attempt, retirement=retirement_of(session)),
        session_snapshot=session.snapshot.aligned_to(names),
        on_exit=LayerExitSignals(default="delete"),
        metadata={
            "tenant_id": key.tenant_id,
            "app_id": data.app_id,
            "owner_type": key.owner_type.value,
            **owner,
            "binding_id": key.binding_id,
            "agent_id": key.agent_id,
            "agent_config_snapshot_id": data.agent_config_snapshot_id,
            "previous_agent_backend_run_id": data.backend_run_id,
            "agent_backend_lifecycle": "session_cleanup",
        },
    )


@dataclass(frozen=True)
class Cleaner:
    """Cleans sessions up with one store, one repository and (optionally) one backend."""

    cache: RedisSessionCache
    repo: SessionRepository
    backend: AgentBackendClient | None
    wait_s: float

    def clean(self, key: SessionKey, *, last_attempt: bool) -> CleanupResult:
        """One attempt; raises :class:`CleanupFailed` when another attempt should follow."""
        session = load_through(self.cache, self.repo, key).record
        if session is None or session.status is not SessionStatus.CLEANING:
            return CleanupResult("skipped")
        if self.backend is None or not session.layer_specs:
            self.cache.mark_cleaned(key, cleanup_run_id=None)
            return CleanupResult("cleaned_locally")
        try:
            run_id = _Attempt(self, self.backend, session).run()
        except Exception as exc:
            if not last_attempt:
                raise CleanupFailed(str(exc)) from exc
            error = f"cleanup gave up: {exc}"
            self.cache.mark_cleaned(key, error=error)
            log.warning("cleanup of %s gave up: %s", key, exc)
            return CleanupResult("gave_up", error=error)
        self.cache.mark_cleaned(key, cleanup_run_id=run_id)
        return CleanupResult("cleaned", cleanup_run_id=run_id)


@dataclass(frozen=True)
class _Attempt:
    """One cleanup attempt: ask the remembered run first, create a new one only if needed."""

    cleaner: Cleaner
    backend: AgentBackendClient
    session: StoredSession

    def run(self) -> str:
        remembered, attempt = self.cleaner.cache.cleanup_state(self.session.key)
        if remembered is not None:
            status = self._status(remembered)
            if status is not None and status.status not in _FAILED:
                return self._confirmed(status)
            if status is not None:
                attempt += 1  # it failed: a backend may keep that key, so derive a new one
        created = self._create(attempt)
        if created.status in _FAILED:  # the backend handed back an earlier failed run
            created = self._create(attempt + 1)
        return self._confirmed(self.backend.wait_run(created.run_id, timeout_s=self._wait_s))

    @property
    def _wait_s(self) -> float:
        return self.cleaner.wait_s

    def _create(self, attempt: int) -> CreateRunResponse:
        created = self.backend.create_run(cleanup_request(self.session, attempt))
        self.cleaner.cache.note_cleanup(self.session.key, created.run_id, attempt)
        return created

    def _status(self, run_id: str) -> RunStatusResponse | None:
        try:
            return self.backend.get_run(run_id)
        except BackendNotFound:
            return None

    def _confirmed(self, status: RunStatusResponse) -> str:
        """Wait for the run to end; its id if it succeeded, else :class:`CleanupFailed`."""
        if not status.terminal:
            status = self.backend.wait_run(status.run_id, timeout_s=self._wait_s)
        if status.status != "succeeded":
            detail = status.error or f"status {status.status}"
            raise CleanupFailed(f"cleanup run {status.run_id} ended {status.status}: {detail}")
        return status.run_id


def _digest(key_name: str) -> str:
    return hashlib.sha1(key_name.encode()).hexdigest()  # noqa: S324 (a name, not a secret)


def cleanup_marker(prefix: str, key_name: str) -> str:
    """The queue Redis key that says a cleanup of the session is queued or running."""
    return f"{prefix}:cleanup_pending:{_digest(key_name)}"


def request_cleanup(
    queue: Queue, prefix: str, key_name: str, key: SessionKey, attempts: int
) -> bool:
    """Queue the cleanup of one session; ``False`` if one is already queued or running.

    A fresh job id every time; the session's pending marker (``SET NX``) is what prevents
    duplicates. It lives :data:`CLEANUP_PENDING_TTL_S`, renewed by every attempt and deleted
    when the job ends for good, and is taken over at once when RQ no longer has its job.
    """
    marker = cleanup_marker(prefix, key_name)
    job_id = f"{prefix}-cleanup-{_digest(key_name)[:16]}-{secrets.token_hex(4)}"
    with translate_queue_errors("requesting a cleanup"):
        if not claim_marker(queue.connection, marker, job_id, CLEANUP_PENDING_TTL_S * 1000):
            return False
        intervals = CLEANUP_INTERVALS_S[: max(attempts - 1, 1)]
        try:
            queue.enqueue(
                CLEANUP_JOB,
                *key.parts(),
                key.owner_type.value,
                job_id=job_id,
                retry=Retry(max=attempts - 1, interval=intervals) if attempts > 1 else None,
                job_timeout=CLEANUP_JOB_TIMEOUT_S,
                result_ttl=600,
                failure_ttl=7 * 86_400,
            )
        except BaseException:
            queue.connection.delete(marker)
            raise
    return True


def cleanup_pending(connection: redis.Redis, prefix: str, key_name: str, *, done: bool) -> None:
    """Renew the session's pending marker at an attempt's start, or drop it when ``done``."""
    marker = cleanup_marker(prefix, key_name)
    with translate_queue_errors("updating a cleanup marker"):
        if done:
            connection.delete(marker)
        else:
            connection.expire(marker, CLEANUP_PENDING_TTL_S)
