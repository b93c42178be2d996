"""The fake agent backend's run records: each run, its behaviour and its completion timer,
and the idempotency keys that lead back to a run (``fake_backend`` serves them over HTTP)."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, replace
from datetime import datetime

import msgspec

from agent_backend.models import (
    CancelRunRequest,
    CompositorSessionSnapshot,
    CreateRunRequest,
    JsonValue,
    RunStatus,
    RunStatusResponse,
)
from agent_sessions.testing.fake_agent import (
    Behaviour,
    Outcome,
    Rule,
    Script,
    is_cleanup_request,
    plan_run,
    utc_now,
)

_KEY_RELEASING: frozenset[RunStatus] = frozenset({"failed", "cancelled"})
_NOT_CANCELLABLE: frozenset[RunStatus] = frozenset({"succeeded", "failed", "paused"})


@dataclass(frozen=True, slots=True)
class FakeRun:
    """One run as the fake keeps it: the full request plus its current state (immutable)."""

    run_id: str
    request: CreateRunRequest
    behaviour: Behaviour
    status: RunStatus
    created_at: datetime
    updated_at: datetime
    error: str | None = None
    session_snapshot: CompositorSessionSnapshot | None = None
    output: JsonValue = None
    pause_reason: str | None = None
    deferred_tool_call: dict[str, JsonValue] | None = None
    cancel_request: CancelRunRequest | None = None

    @property
    def is_cleanup(self) -> bool:
        return is_cleanup_request(self.request)

    def finished(self, outcome: Outcome) -> FakeRun:
        return replace(
            self,
            status=outcome.status,
            updated_at=utc_now(),
            error=outcome.error,
            session_snapshot=outcome.session_snapshot,
            output=outcome.output,
            pause_reason=outcome.pause_reason,
            deferred_tool_call=outcome.deferred_tool_call,
        )

    def to_status(self) -> RunStatusResponse:
        return RunStatusResponse(
            run_id=self.run_id,
            status=self.status,
            created_at=self.created_at,
            updated_at=self.updated_at,
            error=self.error,
            session_snapshot=self.session_snapshot,
            output=self.output,
            pause_reason=self.pause_reason,
            deferred_tool_call=self.deferred_tool_call,
        )


class RunListResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Answer of ``GET /runs`` (fake only): every run, in creation order."""

    runs: list[RunStatusResponse]


class RunConflict(Exception):
    def __init__(self, run: FakeRun) -> None:
        super().__init__(f"run {run.run_id} already {run.status}")
        self.run = run


class RunStore:
    """Thread-safe run records, behaviour rules and completion timers."""

    def __init__(self, finish_delay_s: float, *, dedupe_failed: bool = False) -> None:
        self._dedupe_failed = dedupe_failed
        self._lock = threading.Lock()
        self._runs: dict[str, FakeRun] = {}
        self._by_key: dict[str, str] = {}
        self._timers: dict[str, threading.Timer] = {}
        self._script = Script()
        self._delay_s = finish_delay_s

    def create(self, request: CreateRunRequest) -> tuple[FakeRun, bool]:
        """The new run and True, or the deduplicated earlier run and False."""
        with self._lock:
            existing = self._deduplicated(request)
            if existing is not None:
                return existing, False
            return self._new_run(request), True

    def _deduplicated(self, request: CreateRunRequest) -> FakeRun | None:
        key = request.idempotency_key
        run = self._runs.get(self._by_key.get(key, "")) if key is not None else None
        if run is None or (run.status in _KEY_RELEASING and not self._dedupe_failed):
            return None
        return run

    def _new_run(self, request: CreateRunRequest) -> FakeRun:
        behaviour = self._script.choose(request)
        now = utc_now()
        run_id = f"run-{uuid.uuid4().hex}"
        run = FakeRun(run_id, request, behaviour, "running", created_at=now, updated_at=now)
        self._runs[run_id] = run
        if request.idempotency_key is not None:
            self._by_key[request.idempotency_key] = run_id
        self._schedule(run)
        return run

    def _schedule(self, run: FakeRun) -> None:
        outcome, delay_s = plan_run(run.run_id, run.request, run.behaviour, self._delay_s)
        if outcome is None:
            return
        timer = threading.Timer(delay_s, self._finish, args=(run.run_id, outcome))
        timer.daemon = True
        self._timers[run.run_id] = timer
        timer.start()

    def _finish(self, run_id: str, outcome: Outcome) -> None:
        with self._lock:
            self._timers.pop(run_id, None)
            run = self._runs.get(run_id)
            if run is not None and run.status == "running":
                self._runs[run_id] = run.finished(outcome)

    def cancel(self, run_id: str, request: CancelRunRequest) -> FakeRun:
        """Cancel a running run; ``KeyError`` if unknown, :class:`RunConflict` if it ended."""
        with self._lock:
            run = self._runs[run_id]
            if run.status in _NOT_CANCELLABLE:
                raise RunConflict(run)
            if run.status == "running":
                self._cancel_timer(run_id)
                run = replace(run, status="cancelled", cancel_request=request, updated_at=utc_now())
                self._runs[run_id] = run
            return run

    def _cancel_timer(self, run_id: str) -> None:
        timer = self._timers.pop(run_id, None)
        if timer is not None:
            timer.cancel()

    def get(self, run_id: str) -> FakeRun | None:
        with self._lock:
            return self._runs.get(run_id)

    def all(self) -> list[FakeRun]:
        with self._lock:
            return list(self._runs.values())

    def add_rule(self, rule: Rule) -> None:
        with self._lock:
            self._script.rules.append(rule)

    def set_default(self, behaviour: Behaviour) -> None:
        with self._lock:
            self._script.default = behaviour

    def clear_behaviours(self) -> None:
        with self._lock:
            self._script = Script()

    def clear_runs(self) -> None:
        with self._lock:
            for run_id in list(self._timers):
                self._cancel_timer(run_id)
            self._runs.clear()
            self._by_key.clear()

    def cancel_timers(self) -> None:
        with self._lock:
            for run_id in list(self._timers):
                self._cancel_timer(run_id)
