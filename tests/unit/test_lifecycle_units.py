"""Pure parts of the lifecycle contract: specs, history placement, keys, outcomes, alignment."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent_backend.models import (
    CompositorSessionSnapshot,
    CreateRunRequest,
    LayerSessionSnapshot,
    RunComposition,
    RunLayerSpec,
    RunStatus,
    RunStatusResponse,
)
from agent_sessions.outcomes import RunOutcome
from agent_sessions.requests import (
    CREDENTIAL_LAYER_TYPES,
    HISTORY_LAYER,
    extract_layer_specs,
    idempotency_key,
    with_history,
)
from cache.errors import InvalidInput
from cache.records import LayerSpec, LifecycleState, Snapshot, SnapshotLayer
from tests import factories as f

NOW = datetime(2024, 1, 1, tzinfo=UTC)


def layer(name: str, type_: str, **extra: object) -> RunLayerSpec:
    return RunLayerSpec(name=name, type=type_, **extra)  # type: ignore[arg-type]


def composition(*layers: RunLayerSpec) -> RunComposition:
    return RunComposition(layers=list(layers))


def full_composition() -> RunComposition:
    return composition(
        layer("agent_soul_prompt", "plain.prompt", config={"prefix": "be kind"}),
        layer("execution_context", "dify.execution_context", config={"tenant_id": "t"}),
        layer("history", "pydantic_ai.history"),
        layer("llm", "dify.plugin.llm", config={"credentials": {"api_key": "sk"}}),
        layer("tools", "dify.plugin.tools", config={"credentials": {"token": "x"}}),
        layer("core", "dify_core_tools", config={"secret": "s"}),
        layer("output", "dify.output", deps={"ctx": "execution_context"}, config={"n": 1}),
    )


def status(kind: RunStatus, **extra: object) -> RunStatusResponse:
    return RunStatusResponse(
        run_id="run-9",
        status=kind,
        created_at=NOW,
        updated_at=NOW,
        **extra,  # type: ignore[arg-type]
    )


def wire_snapshot(*names: str) -> CompositorSessionSnapshot:
    return CompositorSessionSnapshot(
        layers=[
            LayerSessionSnapshot(name=n, lifecycle_state="suspended", runtime_state={"n": n})
            for n in names
        ]
    )


REQUEST = CreateRunRequest(composition=composition(layer("llm", "dify.plugin.llm")))


# ------------------------------------------------------------------------- layer specs


def test_extract_layer_specs_drops_every_credential_layer_and_keeps_order_and_config() -> None:
    """Specs keep every non-plugin layer, in composition order, with its full config."""
    specs = extract_layer_specs(full_composition())
    assert [s.name for s in specs] == [
        "agent_soul_prompt",
        "execution_context",
        "history",
        "output",
    ]
    assert not {s.type for s in specs} & CREDENTIAL_LAYER_TYPES
    assert specs[0] == LayerSpec("agent_soul_prompt", "plain.prompt", config={"prefix": "be kind"})
    assert specs[3].deps == {"ctx": "execution_context"} and specs[3].config == {"n": 1}
    assert "credentials" not in repr(specs) and "secret" not in repr(specs)


def test_extract_layer_specs_of_a_plugin_only_composition_is_empty() -> None:
    """A composition of credential layers alone leaves nothing replayable."""
    plugins = composition(layer("llm", "dify.plugin.llm"), layer("tools", "dify.plugin.tools"))
    assert extract_layer_specs(plugins) == ()


# ----------------------------------------------------------------------------- history


def test_with_history_places_history_right_before_the_model_layer() -> None:
    """The history layer goes before the llm layer, after the context layers."""
    base = composition(
        layer("prompt", "plain.prompt"),
        layer("execution_context", "dify.execution_context"),
        layer("llm", "dify.plugin.llm"),
        layer("output", "dify.output"),
    )
    sent = with_history(base)
    assert sent.layer_names() == ("prompt", "execution_context", "history", "llm", "output")
    assert sent.layers[2] == HISTORY_LAYER
    assert HISTORY_LAYER.type == "pydantic_ai.history"
    assert base.layer_names() == ("prompt", "execution_context", "llm", "output")  # untouched


def test_with_history_never_duplicates_an_existing_history_layer() -> None:
    """A composition that already has a history layer (by name or by type) is returned as is."""
    by_name = composition(layer("history", "custom.history"), layer("llm", "dify.plugin.llm"))
    by_type = composition(layer("memory", "pydantic_ai.history"), layer("llm", "dify.plugin.llm"))
    assert with_history(by_name) is by_name
    assert with_history(by_type) is by_type
    twice = with_history(with_history(composition(layer("llm", "dify.plugin.llm"))))
    assert twice.layer_names() == ("history", "llm")


def test_with_history_appends_when_there_is_no_model_layer() -> None:
    """Without any credential layer the history layer goes last."""
    sent = with_history(composition(layer("prompt", "plain.prompt")))
    assert sent.layer_names() == ("prompt", "history")


# ---------------------------------------------------------------------- idempotency key


@pytest.mark.parametrize(
    ("run", "attempt", "expected"),
    [
        ("run-1", 0, "run-1:exec-1"),
        ("run-1", 1, "run-1:exec-1:retry-1"),
        ("run-1", 7, "run-1:exec-1:retry-7"),
        (None, 0, "exec-1"),
        (None, 2, "exec-1:retry-2"),
    ],
)
def test_idempotency_key_keeps_the_legacy_shape_and_differs_per_retry(
    run: str | None, attempt: int, expected: str
) -> None:
    """Attempt 0 is "{run}:{node_execution}"; attempt n >= 1 adds ":retry-{n}"."""
    assert idempotency_key(f.scope(run=run), attempt) == expected


def test_idempotency_keys_of_all_attempts_are_distinct() -> None:
    """Each retry attempt uses its own key, so backend dedup cannot replay an earlier run."""
    keys = {idempotency_key(f.scope(), attempt) for attempt in range(10)}
    assert len(keys) == 10


# --------------------------------------------------------------------------- outcomes


def test_from_status_of_a_success_carries_the_snapshot() -> None:
    """A succeeded run becomes a succeeded outcome with its snapshot as a domain record."""
    outcome = RunOutcome.from_status(
        REQUEST, status("succeeded", session_snapshot=wire_snapshot("a"))
    )
    assert outcome.status == "succeeded" and outcome.backend_run_id == "run-9"
    assert outcome.request is REQUEST
    assert outcome.snapshot is not None and outcome.snapshot.layer_names() == ("a",)
    assert outcome.snapshot.layers[0].runtime_state == {"n": "a"}
    assert outcome.pending_form_id is None and outcome.pending_tool_call_id is None


def test_from_status_of_a_plain_pause_ignores_the_form_id() -> None:
    """A pause without a deferred tool call has no pending ids, whatever form id is passed."""
    outcome = RunOutcome.from_status(
        REQUEST,
        status("paused", session_snapshot=wire_snapshot("a"), pause_reason="why"),
        pending_form_id="form-1",
    )
    assert outcome.status == "paused" and outcome.pause_reason == "why"
    assert outcome.pending_form_id is None and outcome.pending_tool_call_id is None


def test_from_status_of_a_human_input_pause_carries_both_pending_ids() -> None:
    """A deferred ask_human call gives the tool-call id and keeps the engine's form id."""
    call = {"tool_call_id": "call-1", "tool_name": "ask_human", "args": {}}
    outcome = RunOutcome.from_status(
        REQUEST,
        status("paused", session_snapshot=wire_snapshot("a"), deferred_tool_call=call),
        pending_form_id="form-1",
    )
    assert outcome.pending_form_id == "form-1"
    assert outcome.pending_tool_call_id == "call-1"


@pytest.mark.parametrize("kind", ["failed", "cancelled"])
def test_from_status_of_a_failure_carries_the_error_and_no_snapshot(kind: RunStatus) -> None:
    """Failed and cancelled runs keep their error and run id; they have no snapshot."""
    outcome = RunOutcome.from_status(REQUEST, status(kind, error="boom"))
    assert outcome.status == kind and outcome.error == "boom"
    assert outcome.backend_run_id == "run-9" and outcome.snapshot is None


def test_from_status_of_a_running_run_is_refused() -> None:
    """A run that has not ended is not an outcome."""
    with pytest.raises(InvalidInput, match="has not ended"):
        RunOutcome.from_status(REQUEST, status("running"))


# -------------------------------------------------------------------------- alignment


def snap(*names: str) -> Snapshot:
    return Snapshot(
        layers=tuple(SnapshotLayer(n, LifecycleState.SUSPENDED, {"n": n}) for n in names),
        schema_version=1,
    )


def test_aligned_to_the_same_names_returns_the_same_snapshot() -> None:
    """Nothing to align: the very same object comes back."""
    s = snap("a", "b")
    assert s.aligned_to(["a", "b"]) is s


def test_aligned_to_drops_extra_layers_and_follows_the_given_order() -> None:
    """Alignment keeps the named layers' states, in the names' order, and drops the rest."""
    aligned = snap("llm", "history", "prompt", "ctx").aligned_to(["prompt", "ctx", "history"])
    assert aligned.layer_names() == ("prompt", "ctx", "history")
    assert [layer.runtime_state for layer in aligned.layers] == [
        {"n": "prompt"},
        {"n": "ctx"},
        {"n": "history"},
    ]
    assert all(layer.lifecycle_state is LifecycleState.SUSPENDED for layer in aligned.layers)


def test_aligned_to_starts_a_missing_layer_new() -> None:
    """A layer the snapshot lacks appears as ``new`` with an empty state."""
    aligned = snap("history").aligned_to(["prompt", "history"])
    assert aligned.layer_names() == ("prompt", "history")
    assert aligned.layers[0] == SnapshotLayer("prompt", LifecycleState.NEW, {})
    assert aligned.layers[1].runtime_state == {"n": "history"}


def test_aligned_to_keeps_the_schema_version_and_can_empty_a_snapshot() -> None:
    """The schema version survives alignment; aligning to nothing gives an empty snapshot."""
    s = Snapshot(layers=(SnapshotLayer("a", LifecycleState.SUSPENDED),), schema_version=3)
    assert s.aligned_to(["b"]).schema_version == 3
    assert s.aligned_to([]).layers == ()
