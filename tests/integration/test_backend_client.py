"""AgentBackendClient against real HTTP servers on loopback: the fake agent backend, and a
hostile server (``hostile_http``) that trickles, stalls, floods, resets and lies. Every hostile
mode must end in a typed error within the call's deadline. Only
``test_retry_policy_with_mock_transport`` uses a mock transport.
"""

from __future__ import annotations

import resource
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import cast

import httpx
import msgspec
import pytest

from agent_backend.client import (
    DEFAULT_MAX_RESPONSE_BYTES,
    AgentBackendClient,
    BackendHTTPError,
    BackendNotFound,
    BackendResponseTooLarge,
    BackendTimeout,
    BackendTransportError,
    BackendValidationError,
    response_cap,
)
from agent_backend.models import (
    CancelRunRequest,
    CompositorSessionSnapshot,
    CreateRunRequest,
    JsonValue,
    LayerExitSignals,
    RunComposition,
    RunLayerSpec,
    RunStatusResponse,
    composition_from_specs,
)
from agent_sessions.testing.fake_backend import FakeAgentBackend
from cache.errors import AgentBackendError, InvalidInput
from cache.records import LayerSpec
from cache.settings import MiB, Settings
from tests.integration import hostile_http as hostile
from tests.integration.hostile_http import Behaviour, HostileServer
from workers.context import _backend as worker_backend

WAIT_S = 5.0
PLUGIN_TYPES = {"dify.plugin.llm", "dify.plugin.tools"}


def node_composition() -> RunComposition:
    return RunComposition(
        layers=[
            RunLayerSpec(name="workflow_node_job_prompt", type="plain.prompt", config={"p": 1}),
            RunLayerSpec(name="execution_context", type="dify.execution_context"),
            RunLayerSpec(name="history", type="pydantic_ai.history"),
            RunLayerSpec(
                name="llm", type="dify.plugin.llm", deps={"execution_context": "execution_context"}
            ),
        ]
    )


def node_request(
    snapshot: CompositorSessionSnapshot | None = None, behaviour: str | None = None
) -> CreateRunRequest:
    metadata = {} if behaviour is None else {"fake_behaviour": behaviour}
    return CreateRunRequest(
        composition=node_composition(),
        idempotency_key=None,
        metadata=metadata,
        session_snapshot=snapshot,
    )


def run_to_end(client: AgentBackendClient, request: CreateRunRequest) -> RunStatusResponse:
    created = client.create_run(request)
    assert created.status == "running"
    return client.wait_run(created.run_id, timeout_s=WAIT_S, poll_interval_s=0.01)


def history_messages(status: RunStatusResponse) -> list[dict[str, JsonValue]]:
    assert status.session_snapshot is not None
    layers = status.session_snapshot.decoded().layers
    (history,) = [layer for layer in layers if layer.name == "history"]
    messages = history.runtime_state["messages"]
    assert isinstance(messages, list)
    assert all(isinstance(message, dict) for message in messages)
    return cast(list[dict[str, JsonValue]], messages)


@pytest.fixture
def fake() -> Iterator[FakeAgentBackend]:
    with FakeAgentBackend() as backend:
        yield backend


@pytest.fixture
def client(fake: FakeAgentBackend) -> Iterator[AgentBackendClient]:
    with AgentBackendClient(fake.url, timeout_s=5.0) as backend_client:
        yield backend_client


# ------------------------------------------------------------------------ happy paths


def test_create_and_wait_returns_snapshot_with_history(client: AgentBackendClient) -> None:
    status = run_to_end(client, node_request())
    assert status.status == "succeeded"
    assert status.error is None
    assert status.output == {"text": f"fake answer of run {status.run_id}"}
    assert status.session_snapshot is not None
    assert status.session_snapshot.layer_names() == node_composition().layer_names()
    assert {layer.lifecycle_state for layer in status.session_snapshot.layers} == {"suspended"}
    assert history_messages(status) == [{"role": "assistant", "run": status.run_id, "n": 1}]


def test_resume_with_snapshot_continues_history(client: AgentBackendClient) -> None:
    first = run_to_end(client, node_request())
    assert first.session_snapshot is not None
    stored = first.session_snapshot
    second = run_to_end(client, node_request(stored))
    assert second.status == "succeeded"
    messages = history_messages(second)
    assert [m["run"] for m in messages] == [first.run_id, second.run_id]
    assert [m["n"] for m in messages] == [1, 2]


def test_name_order_mismatch_is_accepted_then_fails(client: AgentBackendClient) -> None:
    first = run_to_end(client, node_request())
    assert first.session_snapshot is not None
    reordered = msgspec.structs.replace(
        first.session_snapshot, layers=tuple(reversed(first.session_snapshot.layers))
    )
    created = client.create_run(node_request(reordered))
    assert created.status == "running"
    status = client.wait_run(created.run_id, timeout_s=WAIT_S, poll_interval_s=0.01)
    assert status.status == "failed"
    expected = list(node_composition().layer_names())
    assert status.error == (
        "CompositorSessionSnapshot layer names must match compositor layers in order. "
        f"Expected {expected}, got {list(reversed(expected))}"
    )
    assert status.session_snapshot is None


def test_cleanup_run_replays_specs_and_closes_every_layer(client: AgentBackendClient) -> None:
    first = run_to_end(client, node_request())
    specs = [(layer) for layer in node_composition().layers if layer.type not in PLUGIN_TYPES]
    assert first.session_snapshot is not None
    stored = first.session_snapshot
    filtered = stored.aligned_to([spec.name for spec in specs])
    request = CreateRunRequest(
        composition=composition_from_specs(specs),
        idempotency_key="wr:node:binding:agent-session-cleanup",
        session_snapshot=(filtered),
        on_exit=LayerExitSignals(default="delete"),
    )
    status = run_to_end(client, request)
    assert status.status == "succeeded", status.error
    assert status.session_snapshot is not None
    assert status.session_snapshot.layer_names() == tuple(spec.name for spec in specs)
    assert {layer.lifecycle_state for layer in status.session_snapshot.layers} == {"closed"}
    assert len(history_messages(status)) == 1  # a cleanup run does not talk


def test_cleanup_with_unfiltered_snapshot_hits_the_trap(client: AgentBackendClient) -> None:
    first = run_to_end(client, node_request())
    specs = [LayerSpec("history", "pydantic_ai.history")]
    request = CreateRunRequest(
        composition=composition_from_specs(specs),
        session_snapshot=first.session_snapshot,
        on_exit=LayerExitSignals(default="delete"),
    )
    status = run_to_end(client, request)
    assert status.status == "failed"
    assert status.error is not None
    assert "must match compositor layers in order" in status.error


# ------------------------------------------------------------------------- behaviours


def test_fail_behaviour(client: AgentBackendClient) -> None:
    status = run_to_end(client, node_request(behaviour="fail:model exploded"))
    assert (status.status, status.error, status.session_snapshot) == (
        "failed",
        "model exploded",
        None,
    )


def test_pause_behaviour_returns_suspended_snapshot(client: AgentBackendClient) -> None:
    status = run_to_end(client, node_request(behaviour="pause"))
    assert status.status == "paused"
    assert status.pause_reason
    assert status.session_snapshot is not None
    assert {layer.lifecycle_state for layer in status.session_snapshot.layers} == {"suspended"}
    assert len(history_messages(status)) == 1


def test_cancel_behaviour(client: AgentBackendClient) -> None:
    status = run_to_end(client, node_request(behaviour="cancel"))
    assert status.status == "cancelled"
    assert status.session_snapshot is None


def test_human_input_behaviour_defers_a_tool_call(client: AgentBackendClient) -> None:
    status = run_to_end(client, node_request(behaviour="human_input"))
    assert status.status == "paused"
    assert status.deferred_tool_call is not None
    assert status.deferred_tool_call["tool_name"] == "ask_human"
    assert status.deferred_tool_call["tool_call_id"] == f"call-{status.run_id}"
    assert isinstance(status.deferred_tool_call["args"], dict)
    assert status.session_snapshot is not None


def test_slow_behaviour_is_running_then_succeeds(client: AgentBackendClient) -> None:
    created = client.create_run(node_request(behaviour="slow:400"))
    assert client.get_run(created.run_id).status == "running"
    status = client.wait_run(created.run_id, timeout_s=WAIT_S, poll_interval_s=0.02)
    assert status.status == "succeeded"
    assert status.updated_at > status.created_at


def test_wait_run_deadline_on_stalled_run_then_cancel(client: AgentBackendClient) -> None:
    created = client.create_run(node_request(behaviour="stall"))
    with pytest.raises(BackendTimeout, match="still running"):
        client.wait_run(created.run_id, timeout_s=0.2, poll_interval_s=0.02)
    cancelled = client.cancel_run(created.run_id, CancelRunRequest(reason="test", message="bye"))
    assert (cancelled.run_id, cancelled.status) == (created.run_id, "cancelled")
    status = client.wait_run(created.run_id, timeout_s=WAIT_S)
    assert status.status == "cancelled"
    assert client.cancel_run(created.run_id).status == "cancelled"  # idempotent


def test_cancel_of_succeeded_run_is_409(client: AgentBackendClient) -> None:
    status = run_to_end(client, node_request())
    with pytest.raises(BackendHTTPError) as caught:
        client.cancel_run(status.run_id)
    assert caught.value.status_code == 409
    assert "succeeded" in str(caught.value.detail)


# ----------------------------------------------------------------------------- errors


def test_unknown_run_is_not_found(client: AgentBackendClient) -> None:
    with pytest.raises(BackendNotFound) as caught:
        client.get_run("no-such-run")
    assert caught.value.status_code == 404
    with pytest.raises(BackendNotFound):
        client.cancel_run("no/such run")
    with pytest.raises(BackendNotFound):
        client.wait_run("no-such-run", timeout_s=1.0)


def test_refused_request_is_validation_error(client: AgentBackendClient) -> None:
    with pytest.raises(BackendValidationError) as caught:
        client.create_run(node_request(behaviour="explode"))
    assert caught.value.status_code == 422
    assert "explode" in str(caught.value.detail)


def test_a_request_json_cannot_hold_is_refused_typed_and_never_sent(
    client: AgentBackendClient, fake: FakeAgentBackend
) -> None:
    before = len(fake.runs())
    request = CreateRunRequest(
        composition=node_composition(), idempotency_key=None, metadata={"note": "x\ud800"}
    )
    with pytest.raises(InvalidInput):
        client.create_run(request)
    assert len(fake.runs()) == before


def test_stopped_server_is_transport_error(fake: FakeAgentBackend) -> None:
    url = fake.url
    fake.stop()
    with AgentBackendClient(url, get_retries=1, retry_backoff_s=0.001) as stopped:
        with pytest.raises(BackendTransportError) as caught:
            stopped.get_run("any")
        assert isinstance(caught.value.__cause__, httpx.ConnectError)
        with pytest.raises(BackendTransportError):
            stopped.create_run(node_request())


# ------------------------------------------------------------- hostile HTTP servers

TIMEOUT_S = 1.0
"""The client's per-call deadline in the hostile tests."""
SLACK_S = 1.0
"""Allowed overrun of a deadline: generous for a loaded 2-core machine (measured: <20 ms)."""
CALLS: dict[str, Callable[[AgentBackendClient], object]] = {
    "get_run": lambda c: c.get_run("r1"),
    "create_run": lambda c: c.create_run(node_request()),
    "cancel_run": lambda c: c.cancel_run("r1"),
}
HOSTILE: dict[str, tuple[Behaviour, type[AgentBackendError]]] = {
    "trickle_body": (hostile.trickle_body, BackendTimeout),
    "trickle_head": (hostile.trickle_head, BackendTimeout),
    "stall_after_head": (hostile.stall_after_head, BackendTimeout),
    "never_answer": (hostile.never_answer, BackendTimeout),
    "huge_chunked": (hostile.huge_chunked, BackendResponseTooLarge),
    "huge_declared": (hostile.huge_declared, BackendResponseTooLarge),
    "gzip_bomb": (hostile.gzip_bomb, BackendValidationError),
    "malformed_json": (
        hostile.respond(200, b'{"run_id": "r1", "status": '),
        BackendValidationError,
    ),
    "not_utf8": (hostile.respond(200, b'{"run_id": "\xff\xfe"}'), BackendValidationError),
    "too_deep": (hostile.respond(200, b"[" * 100_000), BackendValidationError),
    "wrong_type": (hostile.respond(200, b"{}", "text/html"), BackendValidationError),
    "no_type": (hostile.respond(200, b"{}", None), BackendValidationError),
    "reset_mid_body": (hostile.reset_mid_body, BackendTransportError),
    "reset_at_once": (hostile.reset_before_answer, BackendTransportError),
    "close_mid_body": (hostile.close_mid_body, BackendTransportError),
    "not_http": (hostile.garbage, BackendTransportError),
    "503": (hostile.respond(503, b'{"detail": "busy"}'), BackendHTTPError),
    "500_huge": (hostile.huge_error, BackendHTTPError),
    "500_not_json": (hostile.respond(500, b"\xff" * 10, "text/html"), BackendHTTPError),
    "404": (hostile.respond(404, b'{"detail": "no such run"}'), BackendNotFound),
    "422": (hostile.respond(422, b'{"detail": [1, 2]}'), BackendValidationError),
}


@pytest.fixture
def hostile_server() -> Iterator[HostileServer]:
    with HostileServer(hostile.never_answer) as server:
        yield server


def timed(call: Callable[[], object]) -> tuple[BaseException | None, float]:
    """What ``call`` raised (None if nothing) and how long it took."""
    started = time.monotonic()
    try:
        call()
    except Exception as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("mode", HOSTILE)
def test_hostile_server_gives_a_typed_error_within_the_deadline(
    hostile_server: HostileServer, mode: str, call: str
) -> None:
    behaviour, expected = HOSTILE[mode]
    hostile_server.behaviour = behaviour
    with AgentBackendClient(hostile_server.url, timeout_s=TIMEOUT_S) as client:
        error, elapsed = timed(lambda: CALLS[call](client))
    assert type(error) is expected, repr(error)
    assert elapsed < TIMEOUT_S + SLACK_S
    assert isinstance(
        error.__cause__, (httpx.HTTPError, msgspec.DecodeError, RecursionError, type(None))
    )
    if call == "create_run":
        assert len(hostile_server.requests) == 1  # never retried


@pytest.mark.parametrize(
    "behaviour",
    [
        hostile.trickle_body,
        hostile.trickle_head,
        hostile.stall_after_head,
        hostile.never_answer,
        hostile.running_then(hostile.trickle_body),
        hostile.running_then(hostile.never_answer),
        hostile.respond(200, hostile.status_body(status="running")),
    ],
    ids=[
        "trickle_body",
        "trickle_head",
        "stall",
        "silent",
        "ok_then_trickle",
        "ok_then_silent",
        "running",
    ],
)
def test_wait_run_deadline_bounds_every_poll(
    hostile_server: HostileServer, behaviour: Behaviour
) -> None:
    hostile_server.behaviour = behaviour
    with AgentBackendClient(hostile_server.url, timeout_s=10.0) as client:
        error, elapsed = timed(lambda: client.wait_run("r1", timeout_s=2.0, poll_interval_s=0.1))
    assert isinstance(error, BackendTimeout), repr(error)
    assert elapsed < 2.0 + SLACK_S
    if len(hostile_server.requests) > 1:
        assert "still running" in str(error)


def test_get_retries_fit_inside_the_deadline(hostile_server: HostileServer) -> None:
    # Resets fail fast: retried with a doubling backoff only while the backoff leaves time.
    hostile_server.behaviour = hostile.reset_before_answer
    with AgentBackendClient(
        hostile_server.url, timeout_s=TIMEOUT_S, get_retries=10, retry_backoff_s=0.2
    ) as client:
        error, elapsed = timed(lambda: client.get_run("r1"))
    assert isinstance(error, BackendTransportError)
    assert elapsed < TIMEOUT_S + SLACK_S
    assert 2 <= len(hostile_server.requests) <= 4  # 0, 0.2, 0.6 s; 0.6 + 0.8 s is too late


def test_a_timed_out_get_is_not_retried_past_its_deadline(hostile_server: HostileServer) -> None:
    hostile_server.behaviour = hostile.never_answer
    with AgentBackendClient(hostile_server.url, timeout_s=TIMEOUT_S, get_retries=3) as client:
        error, elapsed = timed(lambda: client.get_run("r1"))
    assert isinstance(error, BackendTimeout)
    assert isinstance(error.__cause__, httpx.TimeoutException)
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + SLACK_S
    assert len(hostile_server.requests) == 1


@pytest.mark.parametrize(
    "behaviour", [hostile.huge_chunked, hostile.huge_declared, hostile.huge_error]
)
def test_oversized_answers_keep_memory_bounded_and_drop_the_connection(
    hostile_server: HostileServer, behaviour: Behaviour
) -> None:
    hostile_server.behaviour = behaviour
    cap = DEFAULT_MAX_RESPONSE_BYTES
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    try:
        with AgentBackendClient(hostile_server.url, timeout_s=5.0) as client:
            error, elapsed = timed(lambda: client.get_run("r1"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert isinstance(error, (BackendResponseTooLarge, BackendHTTPError)), repr(error)
    assert elapsed < 5.0
    assert peak < cap + 4 * MiB  # at most the cap, one read and bookkeeping
    assert rss_growth < 100 * MiB  # the body is 300 MB
    assert hostile_server.client_gone.wait(timeout=10)  # dropped, not drained


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_the_cap_is_exact(hostile_server: HostileServer, framing: str) -> None:
    body = hostile.status_body() + b" " * 1000  # trailing whitespace is valid JSON
    respond = hostile.respond if framing == "content-length" else hostile.respond_chunked
    hostile_server.behaviour = respond(200, body)
    with AgentBackendClient(hostile_server.url, max_response_bytes=len(body)) as client:
        assert client.get_run("r1").status == "running"
    with (
        AgentBackendClient(hostile_server.url, max_response_bytes=len(body) - 1) as client,
        pytest.raises(BackendResponseTooLarge) as caught,
    ):
        client.get_run("r1")
    assert caught.value.limit == len(body) - 1
    assert caught.value.status_code == 200


def test_client_still_works_after_a_refused_answer(hostile_server: HostileServer) -> None:
    with AgentBackendClient(hostile_server.url, timeout_s=TIMEOUT_S) as client:
        for behaviour, expected in [HOSTILE["huge_chunked"], HOSTILE["trickle_body"]]:
            hostile_server.behaviour = behaviour
            with pytest.raises(expected):
                client.get_run("r1")
            hostile_server.behaviour = hostile.respond(200, hostile.status_body())
            assert client.get_run("r1").run_id == "r1"


def test_invalid_answer_is_validation_error(hostile_server: HostileServer) -> None:
    hostile_server.behaviour = hostile.respond(200, b'{"run_id": 7, "status": "sideways"}')
    with (
        AgentBackendClient(hostile_server.url) as bad,
        pytest.raises(BackendValidationError) as caught,
    ):
        bad.get_run("r1")
    assert caught.value.status_code == 200
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize(
    ("content_type", "accepted"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/problem+json", True),
        ("text/html", False),
        ("text/plain; charset=utf-8", False),
        (None, False),
    ],
)
def test_only_json_content_types_are_accepted(
    hostile_server: HostileServer, content_type: str | None, accepted: bool
) -> None:
    hostile_server.behaviour = hostile.respond(200, hostile.status_body(), content_type)
    with AgentBackendClient(hostile_server.url) as client:
        if accepted:
            assert client.get_run("r1").status == "running"
        else:
            with pytest.raises(BackendValidationError, match="not JSON"):
                client.get_run("r1")


def test_http_timeout_is_backend_timeout(hostile_server: HostileServer) -> None:
    slow = AgentBackendClient(hostile_server.url, timeout_s=0.1, get_retries=0)
    with slow, pytest.raises(BackendTimeout) as caught:
        slow.get_run("hang")
    assert isinstance(caught.value.__cause__, httpx.TimeoutException)


def test_response_cap_follows_the_snapshot_limit() -> None:
    assert response_cap(4 * MiB) == DEFAULT_MAX_RESPONSE_BYTES == 17 * MiB
    assert response_cap(1024) == 4096 + MiB
    settings = Settings(agent_backend_url="http://127.0.0.1:1", max_snapshot_bytes=2 * MiB)
    client = worker_backend(settings)
    assert client is not None
    with client:
        assert client.max_response_bytes == response_cap(2 * MiB)


def test_errors_share_the_project_root() -> None:
    for error in (BackendTransportError, BackendTimeout, BackendValidationError, BackendHTTPError):
        assert issubclass(error, AgentBackendError)
    assert issubclass(BackendNotFound, BackendHTTPError)


def test_client_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        AgentBackendClient("http://127.0.0.1:1", timeout_s=0)
    with pytest.raises(ValueError, match="get_retries"):
        AgentBackendClient("http://127.0.0.1:1", get_retries=-1)


# ------------------------------------------------- retry policy (the one mock transport)


def _status_json(run_id: str) -> dict[str, object]:
    now = "2025-01-01T00:00:00Z"
    return {"run_id": run_id, "status": "running", "created_at": now, "updated_at": now}


def _flaky(
    calls: list[str], failures: int, error: Callable[[str], Exception]
) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if len(calls) <= failures:
            raise error("simulated")
        return httpx.Response(200, json=_status_json("r1"))

    return httpx.MockTransport(handle)


def test_retry_policy_with_mock_transport() -> None:
    # get_run: fails twice at the transport level, then answers -> retried, succeeds.
    calls: list[str] = []
    transport = _flaky(calls, 2, httpx.ConnectError)
    with AgentBackendClient("http://backend", transport=transport, retry_backoff_s=0.001) as c:
        assert c.get_run("r1").run_id == "r1"
    assert calls == ["GET /runs/r1"] * 3

    # get_run: retries exhausted on timeouts -> BackendTimeout after 1 + get_retries calls.
    calls = []
    transport = _flaky(calls, 99, httpx.ReadTimeout)
    c = AgentBackendClient("http://backend", transport=transport, get_retries=2, retry_backoff_s=0)
    with c, pytest.raises(BackendTimeout):
        c.get_run("r1")
    assert len(calls) == 3

    # create_run: never retried, whatever the transport error.
    for error in (httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError):
        calls = []
        transport = _flaky(calls, 99, error)
        c = AgentBackendClient("http://backend", transport=transport, get_retries=5)
        with c, pytest.raises((BackendTransportError, BackendTimeout)) as caught:
            c.create_run(node_request())
        assert calls == ["POST /runs"]
        assert isinstance(caught.value.__cause__, error)
