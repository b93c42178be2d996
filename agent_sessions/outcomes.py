"""The values a node's entry and exit pass around: what ``enter`` found (:class:`Entry`), how
the backend run ended (:class:`RunOutcome`), what the node reports (:class:`NodeResult`,
:class:`PauseRequest`) and what ``workflow_ended`` did (:class:`EndReport`); with the checks
``SessionLifecycle`` runs on them before anything touches Redis."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypeVar

from agent_backend.models import CreateRunRequest, RunStatusResponse
from cache.errors import AgentSessionsError, InvalidInput, StoreUnavailable, VersionConflict
from cache.records import AnyScope, ConversationScope, LayerSpec, Scope, Snapshot
from cache.validate import check_version

_T = TypeVar("_T")

STORE_ERROR = "workflow_agent_runtime_session_store_error"

BackendOutcome = Literal["succeeded", "paused", "failed", "cancelled"]


@dataclass(frozen=True, slots=True)
class Entry:
    """What ``enter`` found. ``snapshot`` is ``None`` when the node starts fresh.

    The snapshot is as stored: each layer's state still its JSON text, which ``build_request``
    sends as it is (``snapshot.decoded()`` gives the states as Python values)."""

    snapshot: Snapshot | None = None
    layer_specs: tuple[LayerSpec, ...] = ()
    version: int | None = None
    backend_run_id: str | None = None
    pending_form_id: str | None = None
    pending_tool_call_id: str | None = None

    @property
    def resumable(self) -> bool:
        return self.snapshot is not None


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a backend run ended, and the request that started it."""

    status: BackendOutcome
    backend_run_id: str
    request: CreateRunRequest
    snapshot: Snapshot | None = None
    error: str | None = None
    pause_reason: str | None = None
    pending_form_id: str | None = None
    pending_tool_call_id: str | None = None

    @classmethod
    def from_status(
        cls,
        request: CreateRunRequest,
        status: RunStatusResponse,
        *,
        pending_form_id: str | None = None,
    ) -> RunOutcome:
        """From a terminal ``GET /runs/{id}``; ``pending_form_id`` names the engine's form.

        The status's snapshot is taken as it is: from the backend's JSON, each layer's state
        is still that JSON's text, which ``finish`` stores as it is once its nesting is
        checked. Raises only :class:`InvalidInput` (not a terminal status).
        """
        check_type(status, RunStatusResponse, "status")
        if status.status == "running":
            raise InvalidInput(f"run {status.run_id} has not ended")
        call = status.deferred_tool_call or {}
        tool_call_id = call.get("tool_call_id")
        return cls(
            status=status.status,
            backend_run_id=status.run_id,
            request=request,
            snapshot=status.session_snapshot,
            error=status.error,
            pause_reason=status.pause_reason,
            pending_form_id=pending_form_id if call else None,
            pending_tool_call_id=str(tool_call_id) if tool_call_id else None,
        )


@dataclass(frozen=True, slots=True)
class PauseRequest:
    """A workflow-level pause: the workflow stops until resumed, then re-enters the node."""

    reason: str
    human_input: bool = False
    pending_form_id: str | None = None
    pending_tool_call_id: str | None = None


@dataclass(frozen=True, slots=True)
class NodeResult:
    """What the node reports. ``conflict`` means another entry saved the session first."""

    status: Literal["completed", "paused", "failed"]
    error: str | None = None
    pause: PauseRequest | None = None
    version: int | None = None
    conflict: bool = False
    metadata: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EndReport:
    """What ``workflow_ended`` did."""

    sessions: int
    moved_to_cleaning: int
    cleanups_enqueued: int
    already_ended: bool


FINISH_STATUSES = frozenset({"succeeded", "paused", "failed", "cancelled"})


def check_type(value: object, kind: type[_T], name: str) -> _T:
    if not isinstance(value, kind):
        raise InvalidInput(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def check_scope(scope: AnyScope) -> AnyScope:
    if not isinstance(scope, Scope | ConversationScope):
        raise InvalidInput(
            f"scope must be a Scope or a ConversationScope, got {type(scope).__name__}"
        )
    return scope


def check_finish(scope: AnyScope, entry: Entry, outcome: RunOutcome) -> None:
    check_scope(scope)
    check_type(entry, Entry, "entry")
    check_type(outcome, RunOutcome, "outcome")
    if outcome.status not in FINISH_STATUSES:
        raise InvalidInput(f"outcome.status must be one of {sorted(FINISH_STATUSES)}")
    if entry.version is not None:
        check_version("entry.version", entry.version)
    if outcome.snapshot is not None:
        check_type(outcome.snapshot, Snapshot, "outcome.snapshot")
    check_type(outcome.request, CreateRunRequest, "outcome.request")


def persist_failed(exc: AgentSessionsError) -> dict[str, object]:
    """``session_snapshot_persisted`` is ``False`` when nothing was written, ``None`` when the
    save was sent and its reply lost (it may have been applied: the next ``enter`` tells)."""
    code = "version_conflict" if isinstance(exc, VersionConflict) else STORE_ERROR
    unknown = isinstance(exc, StoreUnavailable) and exc.outcome_unknown
    return {
        "session_snapshot_persisted": None if unknown else False,
        "session_snapshot_persist_error": code,
        "session_store_error_type": type(exc).__name__,
        "session_store_error_detail": str(exc),
    }
