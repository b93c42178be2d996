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
marker that names the job (like flushes: ``workers.queues``). The last attempt marks the
session ``cleaned`` with the error kept, so a broken backend never leaves a session resumable.

Whether a cleanup is alive never rests on RQ's bookkeeping of a running job (RQ declares a
killed job abandoned only after its timeout + 60 s): a running attempt holds the session's
*lease* (:class:`CleanupLease`, renewed by a heartbeat while it waits on the backend), and a
request (the reconciler's, ``cleanup retry``'s) takes the marker over unless its job waits in
the queue, waits for a retry, or the lease is held. So a cleanup killed with its worker is
requested again by the next reconciliation of its owner, within :func:`lease_ttl_ms`. A
worker asked to stop hands its cleanup back: it stops waiting, drops the lease and queues
the cleanup again for the next worker, which asks the run it remembered first.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
from dataclasses import dataclass

import redis
from redis.commands.core import Script
from rq import Queue, Retry
from rq.job import Job

from agent_backend.client import AgentBackendClient, BackendNotFound, WaitStopped
from agent_backend.models import (
    PURPOSES,
    CreateRunRequest,
    CreateRunResponse,
    LayerExitSignals,
    RunStatusResponse,
    composition_from_specs,
)
from cache import keys
from cache.records import OwnerType, SessionKey, SessionStatus, StoredSession
from cache.scripts import source
from cache.settings import Settings
from cache.store import RedisSessionCache
from persistence.repository import SessionRepository
from workers.heartbeat import Heartbeat
from workers.queues import claim_marker, clear_pending, translate_queue_errors
from workers.readthrough import load_through

log = logging.getLogger(__name__)

CLEANUP_JOB = "workers.jobs.cleanup_job"
CLEANUP_INTERVALS_S = [2, 5, 15, 30, 60, 120]
CLEANUP_JOB_TIMEOUT_S = 300
CLEANUP_PENDING_TTL_S = 900
"""The longest a marker outlives news of its job (each attempt renews it); a marker is taken
over at once when its job is not waiting and no lease is held."""
LEASE_TTL_BOUNDS_S = (1.0, 10.0)
_FAILED = frozenset({"failed", "cancelled", "paused"})
"""Terminal states other than success: the run's key may be kept by the backend."""


class CleanupFailed(Exception):
    """The backend did not confirm the cleanup; RQ retries the job."""


@dataclass(frozen=True, slots=True)
class CleanupResult:
    """What one attempt did: ``cleaned``, ``cleaned_locally``, ``skipped``, ``gave_up``, or
    ``handed_back`` (the worker stopped mid-wait; the cleanup is queued again)."""

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
        session_snapshot=session.data.snapshot.aligned_to(names),  # states as stored: text
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
    stop: threading.Event | None = None
    """Once set, a wait on the backend ends with :class:`WaitStopped` (the worker stops)."""

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
        except WaitStopped:
            raise  # not a failure: the attempt is handed back, see workers.jobs
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
        return self._confirmed(self._wait(created.run_id))

    def _wait(self, run_id: str) -> RunStatusResponse:
        return self.backend.wait_run(run_id, timeout_s=self.cleaner.wait_s, stop=self.cleaner.stop)

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
            status = self._wait(status.run_id)
        if status.status != "succeeded":
            detail = status.error or f"status {status.status}"
            raise CleanupFailed(f"cleanup run {status.run_id} ended {status.status}: {detail}")
        return status.run_id


def lease_ttl_ms(settings: Settings) -> int:
    """How long a cleanup's lease outlives its last renewal: half the reconciler's interval,
    1 to 10 s, so that the next reconciliation of a killed cleanup's owner finds it gone."""
    low, high = LEASE_TTL_BOUNDS_S
    return int(min(max(settings.reconcile_interval_s / 2, low), high) * 1000)


class CleanupLease:
    """A running cleanup's claim on its session, renewed every quarter of its lifetime
    until released. At most one attempt per session holds it, so two jobs of one session
    (a request that raced a job's start, an abandoned job RQ retried) never both ask the
    backend for a run."""

    def __init__(self, connection: redis.Redis, key: str, token: str, ttl_ms: int) -> None:
        self.key, self.token, self.ttl_ms = key, token, ttl_ms
        self._take = connection.register_script(source("take_lock"))
        self._release = connection.register_script(source("release_lock"))
        self._heart = Heartbeat(self._renew, ttl_ms / 4000, "cleanup-lease")
        self._held = False

    def take(self) -> bool:
        """Take the lease and start renewing it; ``False`` if another job holds it."""
        with translate_queue_errors("taking a cleanup lease"):
            self._held = self._call(self._take, self.ttl_ms)
        if self._held:
            self._heart.start()
        return self._held

    def release(self) -> None:
        """Stop renewing and give the lease up (it expires if the queue's Redis is down)."""
        if not self._held:
            return
        self._held = False
        self._heart.stop()
        try:
            self._call(self._release)
        except redis.RedisError:
            log.warning("could not release the cleanup lease %s; it expires", self.key)

    def _renew(self) -> bool:
        try:
            if not self._call(self._take, self.ttl_ms):
                log.warning("cleanup lease %s was lost; the attempt goes on", self.key)
                return False
        except redis.RedisError:
            log.warning("could not renew the cleanup lease %s", self.key)
        return True

    def _call(self, script: Script, *args: int) -> bool:
        (code,) = script(keys=[self.key], args=[self.token, *args])
        return int(code) == 0


def cleanup_alive(queue: Queue, prefix: str, key_name: str, job_id: str) -> bool:
    """Whether a cleanup of the session is under way: its job ``job_id`` waits in the
    queue or for a retry (RQ's ``scheduled``), or an attempt holds the lease."""
    with queue.connection.pipeline(transaction=False) as pipe:
        pipe.exists(keys.cleanup_lease(prefix, key_name))
        pipe.hget(Job.key_for(job_id), "status")
        pipe.lpos(queue.key, job_id)
        leased, status, position = pipe.execute()
    return bool(leased) or status == b"scheduled" or (status == b"queued" and position is not None)


def request_cleanup(
    queue: Queue, prefix: str, key_name: str, key: SessionKey, attempts: int
) -> bool:
    """Queue the cleanup of one session; ``False`` if one is already under way.

    A fresh job id every time; the session's marker (``SET NX``) names the job and prevents
    duplicates while :func:`cleanup_alive` says so; it is taken over at once otherwise (the
    job was lost, killed or handed back).
    """
    marker = keys.cleanup_pending(prefix, key_name)
    job_id = f"{prefix}-cleanup-{keys.session_digest(key_name)[:16]}-{secrets.token_hex(4)}"
    with translate_queue_errors("requesting a cleanup"):
        alive = functools.partial(cleanup_alive, queue, prefix, key_name)
        if not claim_marker(queue.connection, marker, job_id, CLEANUP_PENDING_TTL_S * 1000, alive):
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
            clear_pending(queue.connection, marker, job_id)
            raise
    return True


def renew_marker(connection: redis.Redis, prefix: str, key_name: str) -> None:
    """An attempt starts: the marker lives :data:`CLEANUP_PENDING_TTL_S` more."""
    with translate_queue_errors("renewing a cleanup marker"):
        connection.expire(keys.cleanup_pending(prefix, key_name), CLEANUP_PENDING_TTL_S)


def drop_marker(connection: redis.Redis, prefix: str, key_name: str, job_id: str | None) -> None:
    """The job ``job_id`` is done with the session: delete the marker if it names that job
    (a newer request's stays); ``None`` deletes it whatever it names (``cleanup retry
    --force``)."""
    marker = keys.cleanup_pending(prefix, key_name)
    with translate_queue_errors("dropping a cleanup marker"):
        if job_id is None:
            connection.delete(marker)
        else:
            clear_pending(connection, marker, job_id)
