"""The loopback fake agent backend: protocol rules, behaviours, records, standalone entry.

Real HTTP over loopback; runs are awaited with the client's ``wait_run`` (a deadline), never
with fixed sleeps.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from agent_backend.client import AgentBackendClient
from agent_backend.models import (
    CompositorSessionSnapshot,
    CreateRunRequest,
    LayerExitSignals,
    LayerSessionSnapshot,
    RunComposition,
    RunLayerSpec,
    RunStatusResponse,
    decode_json,
)
from agent_sessions.testing.fake_backend import Behaviour, FakeAgentBackend, RunListResponse

WAIT_S = 5.0


def composition(*, llm: bool = True) -> RunComposition:
    layers = [
        RunLayerSpec(name="execution_context", type="dify.execution_context"),
        RunLayerSpec(name="history", type="pydantic_ai.history"),
    ]
    if llm:
        layers.append(RunLayerSpec(name="llm", type="dify.plugin.llm"))
    return RunComposition(layers=layers)


def request(
    key: str | None = None,
    *,
    llm: bool = True,
    on_exit: LayerExitSignals | None = None,
    snapshot: CompositorSessionSnapshot | None = None,
    behaviour: str | None = None,
) -> CreateRunRequest:
    return CreateRunRequest(
        composition=composition(llm=llm),
        idempotency_key=key,
        metadata={} if behaviour is None else {"fake_behaviour": behaviour},
        session_snapshot=snapshot,
        on_exit=on_exit or LayerExitSignals(),
    )


def cleanup_request(key: str = "wr:n:b:agent-session-cleanup") -> CreateRunRequest:
    return request(key, llm=False, on_exit=LayerExitSignals(default="delete"))


@pytest.fixture
def fake() -> Iterator[FakeAgentBackend]:
    with FakeAgentBackend() as backend:
        yield backend


@pytest.fixture
def client(fake: FakeAgentBackend) -> Iterator[AgentBackendClient]:
    with AgentBackendClient(fake.url) as backend_client:
        yield backend_client


@pytest.fixture
def http(fake: FakeAgentBackend) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, timeout=5.0) as raw:
        yield raw


def finish(client: AgentBackendClient, req: CreateRunRequest) -> RunStatusResponse:
    created = client.create_run(req)
    return client.wait_run(created.run_id, timeout_s=WAIT_S, poll_interval_s=0.01)


# ------------------------------------------------------------------------ HTTP surface


def test_create_answers_202_running_then_dedupes_by_key(
    fake: FakeAgentBackend, http: httpx.Client
) -> None:
    body = msgspec.to_builtins(request("wr-1:ne-1", behaviour="stall"))
    first = http.post("/runs", json=body)
    assert (first.status_code, first.json()["status"]) == (202, "running")
    again = http.post("/runs", json=body)
    assert again.status_code == 200
    assert again.json()["run_id"] == first.json()["run_id"]
    assert [run.run_id for run in fake.runs()] == [first.json()["run_id"]]


def test_failed_run_releases_its_idempotency_key(
    fake: FakeAgentBackend, client: AgentBackendClient
) -> None:
    fake.fail_next_cleanups(1, error="backend down")
    failed = finish(client, cleanup_request())
    assert (failed.status, failed.error) == ("failed", "backend down")
    retried = finish(client, cleanup_request())
    assert retried.run_id != failed.run_id
    assert retried.status == "succeeded"
    again = client.create_run(cleanup_request())
    assert again.run_id == retried.run_id


def test_invalid_bodies_are_422(http: httpx.Client) -> None:
    assert http.post("/runs", content=b"not json").status_code == 422
    extra = {**msgspec.to_builtins(request()), "surprise": True}
    answer = http.post("/runs", json=extra)
    assert answer.status_code == 422
    assert "unknown field" in answer.json()["detail"] and "surprise" in answer.json()["detail"]
    bad_state = msgspec.to_builtins(request())
    bad_state["session_snapshot"] = {
        "layers": [{"name": "history", "lifecycle_state": "active", "runtime_state": {}}]
    }
    assert http.post("/runs", json=bad_state).status_code == 422


def test_routes_health_list_and_404(fake: FakeAgentBackend, http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    created = http.post("/runs", json=msgspec.to_builtins(request(behaviour="stall"))).json()
    listed = decode_json(RunListResponse, http.get("/runs").content)
    assert [run.run_id for run in listed.runs] == [created["run_id"]]
    assert http.get("/nope").status_code == 404
    assert http.post("/runs/x/delete").status_code == 404
    assert http.get(f"/runs/{created['run_id']}/cancel").status_code == 404
    cancelled = http.post(f"/runs/{created['run_id']}/cancel")  # empty body is allowed
    assert cancelled.json() == {"run_id": created["run_id"], "status": "cancelled"}


def test_records_keep_the_full_request(fake: FakeAgentBackend, client: AgentBackendClient) -> None:
    sent = request("wr:ne", behaviour="pause")
    status = finish(client, sent)
    record = fake.run(status.run_id)
    assert record.request == sent
    assert record.behaviour == Behaviour("pause")
    assert msgspec.structs.asdict(record.to_status()) == msgspec.structs.asdict(status)
    assert not record.is_cleanup
    with pytest.raises(KeyError):
        fake.run("unknown")


# ---------------------------------------------------------------------- protocol rules


def test_closed_layer_in_snapshot_cannot_be_entered(client: AgentBackendClient) -> None:
    done = finish(client, request(on_exit=LayerExitSignals(layers={"history": "delete"})))
    assert done.session_snapshot is not None
    states = {layer.name: layer.lifecycle_state for layer in done.session_snapshot.layers}
    assert states == {"execution_context": "suspended", "history": "closed", "llm": "suspended"}
    failed = finish(client, request(snapshot=done.session_snapshot))
    assert failed.status == "failed"
    assert failed.error is not None
    assert "'history' is closed" in failed.error


def test_normal_run_without_llm_fails(client: AgentBackendClient) -> None:
    status = finish(client, request(llm=False))
    assert (status.status, status.error) == (
        "failed",
        "Layer 'llm' is not defined in this compositor run.",
    )


def test_cleanup_without_snapshot_closes_every_layer(client: AgentBackendClient) -> None:
    status = finish(client, cleanup_request())
    assert status.status == "succeeded"
    assert status.output is None
    assert status.session_snapshot is not None
    assert [layer.lifecycle_state for layer in status.session_snapshot.layers] == ["closed"] * 2
    layers = status.session_snapshot.decoded().layers
    assert [layer.runtime_state for layer in layers] == [{}, {}]


def test_entry_checks_beat_the_behaviour(client: AgentBackendClient) -> None:
    wrong = CompositorSessionSnapshot(
        layers=[LayerSessionSnapshot(name="llm", lifecycle_state="new", runtime_state={})]
    )
    status = finish(client, request(snapshot=wrong, behaviour="stall"))
    assert status.status == "failed"
    assert status.error is not None
    assert "Expected ['execution_context', 'history', 'llm'], got ['llm']" in status.error


# ------------------------------------------------------------------ programmatic control


def test_default_behaviour_and_prefix_rules(
    fake: FakeAgentBackend, client: AgentBackendClient
) -> None:
    fake.set_behaviour("fail")
    fake.set_behaviour("pause", match_idempotency_prefix="wr-2:", times=1)
    assert finish(client, request("wr-2:a")).status == "paused"
    assert finish(client, request("wr-2:b")).status == "failed"  # rule used up
    assert finish(client, request("wr-1:a", behaviour="succeed")).status == "succeeded"
    fake.clear_behaviours()
    assert finish(client, request("wr-1:b")).status == "succeeded"


def test_script_runs_in_order(fake: FakeAgentBackend, client: AgentBackendClient) -> None:
    fake.script("cancel", "human_input", "fail:third")
    statuses = [finish(client, request()) for _ in range(4)]
    assert [s.status for s in statuses] == ["cancelled", "paused", "failed", "succeeded"]
    assert statuses[1].deferred_tool_call is not None
    assert statuses[2].error == "third"


def test_fail_next_cleanups_spares_node_runs(
    fake: FakeAgentBackend, client: AgentBackendClient
) -> None:
    fake.fail_next_cleanups(2)
    assert finish(client, request()).status == "succeeded"
    assert finish(client, cleanup_request("c1")).status == "failed"
    assert finish(client, cleanup_request("c2")).status == "failed"
    assert finish(client, cleanup_request("c3")).status == "succeeded"
    assert [run.is_cleanup for run in fake.runs()] == [False, True, True, True]


def test_reset_forgets_runs_and_rules(fake: FakeAgentBackend, client: AgentBackendClient) -> None:
    fake.set_behaviour("stall")
    client.create_run(request("k"))
    fake.reset()
    assert fake.runs() == []
    assert finish(client, request("k")).status == "succeeded"


@pytest.mark.parametrize("text", ["explode", "slow:abc", "slow:-1", "pause:x", ""])
def test_unknown_behaviours_are_refused(fake: FakeAgentBackend, text: str) -> None:
    with pytest.raises(ValueError):
        Behaviour.parse(text)
    with pytest.raises(ValueError):
        fake.set_behaviour(text)


def test_behaviour_parsing() -> None:
    assert Behaviour.parse("slow:250") == Behaviour("slow", delay_s=0.25)
    assert Behaviour.parse("fail") == Behaviour("fail")
    with pytest.raises(ValueError):
        FakeAgentBackend().set_behaviour("fail", times=0)
    with pytest.raises(ValueError):
        FakeAgentBackend().fail_next_cleanups(0)


def test_concurrent_creates_are_all_recorded(
    fake: FakeAgentBackend, client: AgentBackendClient
) -> None:
    results: list[str] = []
    lock = threading.Lock()

    def create(i: int) -> None:
        run_id = client.create_run(request(f"wr:{i}")).run_id
        with lock:
            results.append(run_id)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    assert len(set(results)) == 16
    assert {run.run_id for run in fake.runs()} == set(results)
    for run_id in results:
        assert client.wait_run(run_id, timeout_s=WAIT_S, poll_interval_s=0.01).status == "succeeded"


# ---------------------------------------------------------------------------- lifecycle


def test_start_stop_and_url() -> None:
    fake = FakeAgentBackend()
    with pytest.raises(RuntimeError):
        _ = fake.url
    fake.start()
    try:
        assert fake.url.startswith("http://127.0.0.1:")
        with pytest.raises(RuntimeError):
            fake.start()
    finally:
        fake.stop()
    fake.stop()  # idempotent


def test_standalone_entry_point_serves_until_interrupted() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_sessions.testing.fake_backend", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("fake agent backend listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[-1].strip()
        with AgentBackendClient(url) as client:
            assert finish(client, request()).status == "succeeded"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
