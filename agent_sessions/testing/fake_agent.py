"""The simulated agent of the fake backend: behaviours, entry checks, what a run does.

Pure logic, no HTTP: :mod:`agent_sessions.testing.fake_backend` serves it. See that module's
docstring for the behaviour each request can choose.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, TypeAlias

from agent_backend.models import (
    CompositorSessionSnapshot,
    CreateRunRequest,
    ExitIntent,
    JsonValue,
    LayerSessionSnapshot,
    RunComposition,
    RunStatus,
)
from cache.records import LifecycleState

HISTORY_LAYER_TYPE = "pydantic_ai.history"
LLM_LAYER_TYPE = "dify.plugin.llm"
BEHAVIOUR_METADATA_KEY = "fake_behaviour"
DEFAULT_FINISH_DELAY_S = 0.01
SCRIPTED_FAILURE = "fake agent backend: scripted failure"
SCRIPTED_PAUSE = "fake agent backend: scripted pause"
HUMAN_INPUT_PAUSE = "deferred_tool_call"

BehaviourKind: TypeAlias = Literal[
    "succeed", "fail", "pause", "cancel", "stall", "slow", "human_input"
]
_PLAIN_BEHAVIOURS: dict[str, BehaviourKind] = {
    "succeed": "succeed",
    "pause": "pause",
    "cancel": "cancel",
    "stall": "stall",
    "human_input": "human_input",
}
_EXIT_STATE: dict[ExitIntent, LifecycleState] = {
    "suspend": LifecycleState.SUSPENDED,
    "delete": LifecycleState.CLOSED,
}


def utc_now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------ behaviours


@dataclass(frozen=True, slots=True)
class Behaviour:
    """What a run does once its entry checks pass."""

    kind: BehaviourKind
    delay_s: float | None = None
    error: str | None = None

    @classmethod
    def parse(cls, text: str) -> Behaviour:
        """``succeed``, ``fail[:<error>]``, ``pause``, ``cancel``, ``stall``, ``slow:<ms>``…"""
        name, _, arg = text.partition(":")
        if name == "slow":
            return cls("slow", delay_s=_parse_ms(arg))
        if name == "fail":
            return cls("fail", error=arg or None)
        if name in _PLAIN_BEHAVIOURS and not arg:
            return cls(_PLAIN_BEHAVIOURS[name])
        raise ValueError(f"unknown fake behaviour {text!r}")

    @classmethod
    def requested_by(cls, request: CreateRunRequest) -> Behaviour | None:
        """The behaviour named in ``metadata["fake_behaviour"]``, if any (``ValueError``)."""
        value = request.metadata.get(BEHAVIOUR_METADATA_KEY)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"metadata[{BEHAVIOUR_METADATA_KEY!r}] must be a string")
        return cls.parse(value)


def _parse_ms(text: str) -> float:
    try:
        ms = float(text)
    except ValueError:
        raise ValueError(f"slow:<ms> needs a number of milliseconds, got {text!r}") from None
    if ms < 0:
        raise ValueError(f"slow:<ms> must not be negative, got {ms}")
    return ms / 1000


@dataclass(slots=True)
class Rule:
    behaviour: Behaviour
    prefix: str | None = None
    remaining: int | None = None
    cleanup_only: bool = False

    def matches(self, request: CreateRunRequest) -> bool:
        if self.remaining == 0:
            return False
        if self.cleanup_only and not is_cleanup_request(request):
            return False
        return self.prefix is None or (request.idempotency_key or "").startswith(self.prefix)

    def consume(self) -> Behaviour:
        if self.remaining is not None:
            self.remaining -= 1
        return self.behaviour


class Script:
    """Programmatic behaviours: ordered rules (first match wins), then the default."""

    def __init__(self) -> None:
        self.default = Behaviour("succeed")
        self.rules: list[Rule] = []

    def choose(self, request: CreateRunRequest) -> Behaviour:
        requested = Behaviour.requested_by(request)
        if requested is not None:
            return requested
        for rule in self.rules:
            if rule.matches(request):
                chosen = rule.consume()
                self.rules = [r for r in self.rules if r.remaining != 0]
                return chosen
        return self.default


# ------------------------------------------------------------------------ run simulation


def has_llm_layer(composition: RunComposition) -> bool:
    return any(layer.type == LLM_LAYER_TYPE for layer in composition.layers)


def is_cleanup_request(request: CreateRunRequest) -> bool:
    """A cleanup run: no model layer, and every layer deleted on exit by default."""
    return not has_llm_layer(request.composition) and request.on_exit.default == "delete"


def entry_error(request: CreateRunRequest) -> str | None:
    """Why the compositor would refuse to enter this run, or ``None``."""
    snapshot = request.session_snapshot
    if snapshot is not None:
        error = _snapshot_error(request.composition, snapshot)
        if error is not None:
            return error
    if not has_llm_layer(request.composition) and not is_cleanup_request(request):
        return "Layer 'llm' is not defined in this compositor run."
    return None


def _snapshot_error(composition: RunComposition, snapshot: CompositorSessionSnapshot) -> str | None:
    if snapshot.schema_version != 1:
        return f"Unsupported CompositorSessionSnapshot schema_version {snapshot.schema_version}."
    expected, got = list(composition.layer_names()), list(snapshot.layer_names())
    if expected != got:
        return (
            "CompositorSessionSnapshot layer names must match compositor layers in order. "
            f"Expected {expected}, got {got}"
        )
    closed = [layer.name for layer in snapshot.layers if layer.lifecycle_state == "closed"]
    if closed:
        return f"Layer {closed[0]!r} is closed: CLOSED snapshots cannot be entered."
    return None


def _entered_states(run_id: str, request: CreateRunRequest) -> list[dict[str, JsonValue]]:
    """Each layer's runtime state after entering (history appended unless cleanup)."""
    snapshot = request.session_snapshot
    layers = request.composition.layers
    states = [copy.deepcopy(s.runtime_state) for s in snapshot.layers] if snapshot else []
    states = states or [{} for _ in layers]
    if not is_cleanup_request(request):
        for spec, state in zip(layers, states, strict=True):
            if spec.type == HISTORY_LAYER_TYPE:
                _append_history(state, run_id)
    return states


def _append_history(state: dict[str, JsonValue], run_id: str) -> None:
    messages = state.get("messages")
    if not isinstance(messages, list):
        messages = []
    messages.append({"role": "assistant", "run": run_id, "n": len(messages) + 1})
    state["messages"] = messages


def _exited_snapshot(
    run_id: str, request: CreateRunRequest, intent_for: Callable[[str], ExitIntent]
) -> CompositorSessionSnapshot:
    names = request.composition.layer_names()
    states = _entered_states(run_id, request)
    layers = tuple(
        LayerSessionSnapshot(
            name=name, lifecycle_state=_EXIT_STATE[intent_for(name)], runtime_state=state
        )
        for name, state in zip(names, states, strict=True)
    )
    return CompositorSessionSnapshot(layers=layers)


def _suspend_all(_name: str) -> ExitIntent:
    return "suspend"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ends."""

    status: RunStatus
    error: str | None = None
    session_snapshot: CompositorSessionSnapshot | None = None
    output: JsonValue = None
    pause_reason: str | None = None
    deferred_tool_call: dict[str, JsonValue] | None = None


def _succeeded(run_id: str, request: CreateRunRequest, _b: Behaviour) -> Outcome:
    snapshot = _exited_snapshot(run_id, request, request.on_exit.intent_for)
    output: JsonValue = None
    if not is_cleanup_request(request):
        output = {"text": f"fake answer of run {run_id}"}
    return Outcome("succeeded", session_snapshot=snapshot, output=output)


def _failed(_run_id: str, _request: CreateRunRequest, behaviour: Behaviour) -> Outcome:
    return Outcome("failed", error=behaviour.error or SCRIPTED_FAILURE)


def _cancelled(_run_id: str, _request: CreateRunRequest, _b: Behaviour) -> Outcome:
    return Outcome("cancelled")


def _paused(run_id: str, request: CreateRunRequest, _b: Behaviour) -> Outcome:
    snapshot = _exited_snapshot(run_id, request, _suspend_all)
    return Outcome("paused", session_snapshot=snapshot, pause_reason=SCRIPTED_PAUSE)


def _human_input(run_id: str, request: CreateRunRequest, _b: Behaviour) -> Outcome:
    call: dict[str, JsonValue] = {
        "tool_call_id": f"call-{run_id}",
        "tool_name": "ask_human",
        "args": {"question": "fake agent backend: please confirm"},
    }
    snapshot = _exited_snapshot(run_id, request, _suspend_all)
    return Outcome(
        "paused",
        session_snapshot=snapshot,
        pause_reason=HUMAN_INPUT_PAUSE,
        deferred_tool_call=call,
    )


_OUTCOMES: dict[BehaviourKind, Callable[[str, CreateRunRequest, Behaviour], Outcome]] = {
    "succeed": _succeeded,
    "slow": _succeeded,
    "fail": _failed,
    "cancel": _cancelled,
    "pause": _paused,
    "human_input": _human_input,
}


def plan_run(
    run_id: str, request: CreateRunRequest, behaviour: Behaviour, default_delay_s: float
) -> tuple[Outcome | None, float]:
    """The outcome of a run and when it lands (``None``: stays running until cancelled)."""
    error = entry_error(request)
    if error is not None:
        return Outcome("failed", error=error), default_delay_s
    if behaviour.kind == "stall":
        return None, default_delay_s
    delay = default_delay_s if behaviour.delay_s is None else behaviour.delay_s
    return _OUTCOMES[behaviour.kind](run_id, request, behaviour), delay


# ---------------------------------------------------------------------------- run records
