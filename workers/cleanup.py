"""End-of-workflow cleanup of one session on the agent backend (DESIGN §6).

The backend keeps a suspended session's layer resources until somebody sends a run that
deletes them. For a ``cleaning`` session we replay its stored layer specs as the composition,
send the snapshot aligned to the spec names (the backend refuses a snapshot whose layer names
differ from the composition's, in order) with ``on_exit.default = delete``, and wait for the
run's terminal status: creation is accepted before validation happens, so only a
``succeeded`` status proves the cleanup. Only then is the session marked ``cleaned``.

Each session has its own RQ job and its own retries. The last attempt marks the session
``cleaned`` with the error kept, so a broken backend never leaves a session resumable.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from rq import Queue, Retry
from rq.exceptions import DuplicateJobError
from rq.job import JobStatus

from cache.records import SessionKey, SessionStatus, StoredSession
from cache.store import RedisSessionCache
from persistence.repository import SessionRepository
from workers.backend import AgentBackendClient
from workers.backend_models import (
    CreateRunRequest,
    LayerExitSignals,
    composition_from_specs,
    snapshot_to_protocol,
)
from workers.readthrough import load_through

log = logging.getLogger(__name__)

CLEANUP_INTERVALS_S = [2, 5, 15, 30, 60, 120]
CLEANUP_JOB_TIMEOUT_S = 300


class CleanupFailed(Exception):
    """The backend did not confirm the cleanup; RQ retries the job."""


@dataclass(frozen=True, slots=True)
class CleanupResult:
    """What one attempt did: ``cleaned``, ``cleaned_locally``, ``skipped`` or ``gave_up``."""

    outcome: str
    cleanup_run_id: str | None = None
    error: str | None = None


def cleanup_idempotency_key(key: SessionKey) -> str:
    """Stable per session, so repeated attempts share one key.

    DESIGN §6 leaves ``agent_id`` out; two agents on one node and binding would then share
    a key, and the backend would answer the second cleanup with the first one's run.
    """
    return (
        f"{key.workflow_run_id}:{key.node_id}:{key.binding_id}:{key.agent_id}:agent-session-cleanup"
    )


def cleanup_request(session: StoredSession) -> CreateRunRequest:
    """The run that deletes the session's layers: specs replayed, snapshot aligned to them."""
    key, data = session.key, session.data
    names = [spec.name for spec in session.layer_specs]
    return CreateRunRequest(
        composition=composition_from_specs(session.layer_specs),
        purpose="workflow_node",
        idempotency_key=cleanup_idempotency_key(key),
        session_snapshot=snapshot_to_protocol(session.snapshot.aligned_to(names)),
        on_exit=LayerExitSignals(default="delete"),
        metadata={
            "tenant_id": key.tenant_id,
            "app_id": data.app_id,
            "workflow_id": data.workflow_id,
            "workflow_run_id": key.workflow_run_id,
            "node_id": key.node_id,
            "node_execution_id": data.node_execution_id,
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
            run_id = self._run_cleanup(self.backend, session)
        except Exception as exc:
            if not last_attempt:
                raise CleanupFailed(str(exc)) from exc
            error = f"cleanup gave up: {exc}"
            self.cache.mark_cleaned(key, error=error)
            log.warning("cleanup of %s gave up: %s", key, exc)
            return CleanupResult("gave_up", error=error)
        self.cache.mark_cleaned(key, cleanup_run_id=run_id)
        return CleanupResult("cleaned", cleanup_run_id=run_id)

    def _run_cleanup(self, backend: AgentBackendClient, session: StoredSession) -> str:
        created = backend.create_run(cleanup_request(session))
        status = backend.wait_run(created.run_id, timeout_s=self.wait_s)
        if status.status != "succeeded":
            detail = status.error or f"status {status.status}"
            raise CleanupFailed(f"cleanup run {created.run_id} ended {status.status}: {detail}")
        return created.run_id


def cleanup_job_id(prefix: str, key_name: str) -> str:
    """RQ job ids allow ``[A-Za-z0-9_-]`` only, so the session key is hashed."""
    return f"{prefix}-cleanup-{hashlib.sha1(key_name.encode()).hexdigest()}"  # noqa: S324


def enqueue_cleanup(
    queue: Queue,
    prefix: str,
    key_name: str,
    key: SessionKey,
    attempts: int,
    *,
    replace_failed: bool = False,
) -> bool:
    """Queue the cleanup of one session; ``False`` if it is already queued or running.

    With ``replace_failed``, a failed job of the session (kept for inspection) is deleted
    first so that ``cleanup retry`` can queue it again.
    """
    job_id = cleanup_job_id(prefix, key_name)
    if replace_failed:
        _delete_if_failed(queue, job_id)
    intervals = CLEANUP_INTERVALS_S[: max(attempts - 1, 1)]
    try:
        queue.enqueue(
            "workers.jobs.cleanup_job",
            *key.parts(),
            job_id=job_id,
            unique=True,
            retry=Retry(max=attempts - 1, interval=intervals) if attempts > 1 else None,
            job_timeout=CLEANUP_JOB_TIMEOUT_S,
            result_ttl=600,
            failure_ttl=7 * 86_400,
        )
    except DuplicateJobError:
        return False
    return True


def _delete_if_failed(queue: Queue, job_id: str) -> None:
    job = queue.fetch_job(job_id)
    if job is not None and job.get_status() == JobStatus.FAILED:
        job.delete()
