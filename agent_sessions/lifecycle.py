"""``SessionLifecycle``: what a workflow engine calls on every Agent-node entry and exit.

::

    entry = lifecycle.enter(scope)                          # one Redis round trip
    request = lifecycle.build_request(scope, entry, composition, attempt)
    ... run it on the agent backend ...
    result = lifecycle.finish(scope, entry, RunOutcome.from_status(request, status))
    ...
    lifecycle.workflow_ended(tenant_id, workflow_run_id, "succeeded")

The same calls serve a conversation's turns: pass a :class:`ConversationScope` instead of a
:class:`Scope`, and end it with ``conversation_ended(tenant_id, conversation_id)`` (or let
idle expiry retire its sessions). A turn with another ``agent_config_snapshot_id`` starts
fresh and retires the session of the previous config.

A store error never breaks the node: ``finish`` reports it in ``NodeResult.metadata``.
Passing the ``entry`` back makes the save conditional on the version it read, so two
concurrent entries of one session cannot silently overwrite each other.
"""

from __future__ import annotations

import logging

from agent_backend.models import (
    PURPOSES,
    CreateRunRequest,
    LayerExitSignals,
    RunComposition,
)
from agent_sessions.ends import OpenOwners
from agent_sessions.outcomes import (
    STORE_ERROR,
    EndReport,
    Entry,
    NodeResult,
    PauseRequest,
    RunOutcome,
    check_finish,
    check_scope,
    check_type,
    persist_failed,
)
from agent_sessions.requests import (
    extract_layer_specs,
    idempotency_key,
    request_metadata,
    with_history,
)
from cache.client import SERVER_EPOCH
from cache.codec import check_specs_once
from cache.errors import (
    AgentSessionsError,
    InvalidInput,
    RunEnded,
    VersionConflict,
)
from cache.records import (
    WORKFLOW_OUTCOMES,
    AnyScope,
    ClosedBy,
    ConversationScope,
    Owner,
    SessionKey,
    SessionWrite,
)
from cache.replies import Loaded
from cache.settings import Settings
from cache.validate import check_version
from workers.context import WorkerContext
from workers.flush import flush_session
from workers.flush_policy import FlushWhen, flush_after
from workers.readthrough import load_through, retire_through, save_through
from workers.reconcile import reconcile_owner, retire_sessions

log = logging.getLogger(__name__)


class SessionLifecycle:
    """The node contract over one worker context (store, repository, queues)."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self._open_owners = OpenOwners()

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> SessionLifecycle:
        return cls(WorkerContext.from_settings(settings or Settings()))

    def close(self) -> None:
        self.ctx.close()

    # --- entry ---------------------------------------------------------------------------

    def enter(self, scope: AnyScope) -> Entry:
        """The resumable snapshot of the scope's session, or a fresh entry.

        Fresh means: no ``workflow_run_id``, no session, or a ``cleaned``/``cleaning`` one.
        The entry still carries the stored version, so ``finish`` can save conditionally.
        A conversation's turn with another config snapshot than the agent's last session
        retires that session (cleanup on the backend, ``closed_by=config_change``).
        Raises :class:`InvalidInput` for a bad scope, and the store's errors (a node that
        cannot read its state should fail rather than silently start over).
        """
        key = check_scope(scope).key
        if key is None:
            return Entry()
        loaded = load_through(self.ctx.cache, self.ctx.repo, key)
        if not loaded.run_ended and self._ended_in_postgres(key.owner):
            loaded = Loaded(self.ctx.cache.load(key).record, run_ended=True)
        if isinstance(scope, ConversationScope) and not loaded.run_ended:
            self._retire_other_configs(key, loaded)
        session = loaded.session
        if session is None:
            return Entry(version=loaded.version)
        data = session.data
        return Entry(
            snapshot=data.snapshot,
            layer_specs=session.layer_specs,
            version=session.version,
            backend_run_id=data.backend_run_id,
            pending_form_id=data.pending_form_id,
            pending_tool_call_id=data.pending_tool_call_id,
        )

    def _ended_in_postgres(self, owner: Owner) -> bool:
        """Whether Postgres records the owner as ended though Redis does not (asked once per
        owner and Redis server: see :mod:`agent_sessions.ends`). Then Redis went back in
        time: the end is applied again (every session stopped, its cleanup requested), so
        nothing of the owner is resumed or saved."""
        if self._open_owners.known_open(owner):
            return False
        epoch = SERVER_EPOCH.value
        end = self.ctx.repo.end_of(owner)
        if end is None:
            self._open_owners.note_open(owner, epoch)
            return False
        log.warning("%s ended in Postgres but Redis had forgotten it: ending it again", owner)
        reconcile_owner(self.ctx, owner, end.outcome)
        return True

    def _retire_other_configs(self, key: SessionKey, loaded: Loaded) -> None:
        """Retire the agent's sessions of other config snapshots: the one Redis says was
        saved last, and (when Postgres was asked anyway: a miss) every active one Postgres
        holds. Best effort: what fails here, the conversation sweep retires later."""
        stale: list[SessionKey] = []
        try:
            if loaded.current_config not in (None, key.config_id):
                stale.append(
                    SessionKey.conversation(
                        key.tenant_id,
                        key.owner_id,
                        key.binding_id,
                        key.agent_id,
                        str(loaded.current_config),
                    )
                )
            if loaded.record is None:
                stale += self.ctx.repo.other_active_configs(key)
            if stale:
                retire_sessions(self.ctx, key.owner, stale, ClosedBy.CONFIG_CHANGE)
        except AgentSessionsError as exc:
            log.warning("retiring the other configs' sessions of %s failed: %s", key, exc)

    def build_request(
        self,
        scope: AnyScope,
        entry: Entry,
        composition: RunComposition,
        attempt: int = 0,
        *,
        include_history: bool = True,
        metadata: dict[str, object] | None = None,
    ) -> CreateRunRequest:
        """The ``POST /runs`` body for this entry: stored snapshot threaded in, suspend on exit.

        Raises only :class:`InvalidInput` (nothing is written).
        """
        key = check_scope(scope).key
        check_type(entry, Entry, "entry")
        check_type(composition, RunComposition, "composition")
        check_version("attempt", attempt)
        check_specs_once(composition.layers)
        extra = request_metadata(scope, metadata)
        sent = with_history(composition) if include_history else composition
        snapshot = None
        if entry.snapshot is not None:
            snapshot = entry.snapshot.aligned_to(sent.layer_names())
        owner = key.owner_type if key is not None else None
        return CreateRunRequest(
            composition=sent,
            purpose=PURPOSES[owner] if owner is not None else "workflow_node",
            idempotency_key=idempotency_key(scope, attempt),
            metadata=extra,
            session_snapshot=snapshot,
            on_exit=LayerExitSignals(default="suspend"),
        )

    # --- exit ----------------------------------------------------------------------------

    def finish(
        self,
        scope: AnyScope,
        entry: Entry,
        outcome: RunOutcome,
        *,
        durable: bool | None = None,
    ) -> NodeResult:
        """Store what the run left behind and say what the node reports.

        A pause is flushed to Postgres urgently; with ``durable`` (default: the setting
        ``durable_pauses``) it is written to Postgres before this returns, so that a Redis
        crash right after cannot lose it. ``metadata["session_flush"]`` says which happened.

        Raises only :class:`InvalidInput`, for arguments that are not a scope, an entry and an
        outcome of a known status (nothing is written). Everything else (a store error, a
        snapshot or ID the store refuses) never breaks the node: it is reported in
        ``metadata`` (``session_snapshot_persisted: False`` and the error).
        """
        check_finish(scope, entry, outcome)
        if outcome.status in ("failed", "cancelled"):
            return self._retire(scope, outcome)
        durable = self.ctx.settings.durable_pauses if durable is None else durable
        result = self._save(scope, entry, outcome, durable=durable)
        if outcome.status == "succeeded":
            return result
        pause = PauseRequest(
            reason=outcome.pause_reason or "Agent backend run requested workflow pause.",
            human_input=outcome.pending_tool_call_id is not None,
            pending_form_id=outcome.pending_form_id,
            pending_tool_call_id=outcome.pending_tool_call_id,
        )
        return NodeResult(
            status="paused",
            pause=pause,
            version=result.version,
            conflict=result.conflict,
            metadata=result.metadata,
        )

    def _save(
        self, scope: AnyScope, entry: Entry, outcome: RunOutcome, *, durable: bool
    ) -> NodeResult:
        key = scope.key
        if key is None or outcome.snapshot is None:
            return NodeResult("completed")
        try:
            if self._ended_in_postgres(key.owner):
                raise RunEnded(f"{key}: the owner ended (Postgres)")
            write = SessionWrite.for_scope(
                scope,
                outcome.snapshot,
                extract_layer_specs(outcome.request.composition),
                backend_run_id=outcome.backend_run_id,
                pending_form_id=outcome.pending_form_id,
                pending_tool_call_id=outcome.pending_tool_call_id,
            )
            version = save_through(
                self.ctx.cache, self.ctx.repo, key, write, expected_version=entry.version
            )
        except VersionConflict as exc:
            return NodeResult("completed", conflict=True, metadata=persist_failed(exc))
        except AgentSessionsError as exc:
            log.warning("saving the session of %s failed: %s", key, exc)
            return NodeResult("completed", metadata=persist_failed(exc))
        metadata: dict[str, object] = {"session_snapshot_persisted": True}
        when = flush_after(outcome.status, durable=durable)
        if when is FlushWhen.DURABLE:
            metadata |= self._durable_flush(key)
        elif when is FlushWhen.URGENT:
            metadata |= self._urgent_flush(key)
        return NodeResult("completed", version=version, metadata=metadata)

    def _retire(self, scope: AnyScope, outcome: RunOutcome) -> NodeResult:
        error = outcome.error or f"agent backend run {outcome.status}"
        key = scope.key
        if key is None:
            return NodeResult("failed", error=error)
        try:
            retired = retire_through(self.ctx.cache, self.ctx.repo, key, outcome.backend_run_id)
        except AgentSessionsError as exc:
            log.warning("retiring the session of %s failed: %s", key, exc)
            failed: dict[str, object] = {
                "session_snapshot_cleaned_on_failure": False,
                "session_snapshot_cleanup_error": STORE_ERROR,
                "session_store_error_detail": str(exc),
            }
            return NodeResult("failed", error=error, metadata=failed)
        metadata: dict[str, object] = {"session_snapshot_cleaned_on_failure": True}
        if retired is None:
            return NodeResult("failed", error=error, metadata=metadata)
        metadata |= {"session_status": retired.status.value, **self._urgent_flush(key)}
        return NodeResult("failed", error=error, version=retired.version, metadata=metadata)

    def _urgent_flush(self, key: SessionKey) -> dict[str, object]:
        """Pauses may last days and retires must stick: flush now, not after the delay.

        ``session_flush`` is ``enqueued`` (a new urgent job), ``pending`` (an urgent job of
        the shard that has not started yet will take it) or ``failed`` (the queue could not
        be reached: the trigger flushes it once it is due, README "Durability").
        """
        shard = self.ctx.cache.keys.shard_of_key(key)
        try:
            request = self.ctx.request_flush(shard)
        except AgentSessionsError as exc:
            log.warning("could not request an urgent flush of shard %s: %s", shard, exc)
            return {"session_flush": "failed", "session_flush_enqueued": False}
        return {"session_flush": request.value, "session_flush_enqueued": True}

    def _durable_flush(self, key: SessionKey) -> dict[str, object]:
        """Write the session to Postgres now; fall back to an urgent flush if that fails."""
        try:
            if flush_session(self.ctx.cache, self.ctx.repo, key):
                return {"session_flush": "durable", "session_flush_enqueued": False}
            detail = "the session was parked in the poison hash"
        except AgentSessionsError as exc:
            detail = str(exc)
        log.warning("the durable write of %s failed: %s", key, detail)
        return {**self._urgent_flush(key), "session_durable_error": detail}

    # --- end of workflow -----------------------------------------------------------------

    def workflow_ended(self, tenant_id: str, workflow_run_id: str, outcome: str) -> EndReport:
        """End the run: refuse every later save, stop every session, queue their cleanup.

        The end is recorded in Postgres first (the durable fact; the first outcome recorded
        is kept), then applied to Redis. If this raises, nothing is lost: call it again, or
        let the reconciler finish it (``reconcile_grace_s`` later).
        """
        if outcome not in WORKFLOW_OUTCOMES:
            raise InvalidInput(
                f"workflow outcome must be one of {sorted(WORKFLOW_OUTCOMES)}, got {outcome!r}"
                " (a pause is not an end)"
            )
        return self._end(Owner(tenant_id, workflow_run_id), outcome)

    def conversation_ended(self, tenant_id: str, conversation_id: str) -> EndReport:
        """End a conversation: refuse every later save of it, stop every session, queue
        their cleanup (the same steps and guarantees as :meth:`workflow_ended`). A
        conversation that merely goes quiet is not ended: idle expiry retires its sessions
        and its next turn starts fresh."""
        return self._end(Owner.conversation(tenant_id, conversation_id), "ended")

    def _end(self, owner: Owner, outcome: str) -> EndReport:
        grace = self.ctx.settings.reconcile_grace_s
        end, recorded = self.ctx.repo.record_end(owner, outcome, check_after_s=grace)
        done = reconcile_owner(self.ctx, owner, end.outcome)
        return EndReport(
            sessions=done.sessions,
            moved_to_cleaning=done.moved_to_cleaning,
            cleanups_enqueued=done.cleanups_requested,
            already_ended=done.already_ended or not recorded,
        )
