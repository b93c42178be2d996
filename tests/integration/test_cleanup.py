"""End of workflow: fan-out to every session, backend cleanup runs, retries, local cleanup.

Real Redis, Postgres, RQ worker processes (``agent-sessions worker`` with ``AGENT_BACKEND_URL``
pointing at the loopback fake) and, where timing must be controlled, ``Cleaner`` directly.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

import pytest
import redis

from agent_backend.client import AgentBackendClient
from agent_backend.models import (
    CompositorSessionSnapshot,
    CreateRunRequest,
    LayerExitSignals,
    LayerSessionSnapshot,
    RunComposition,
    RunLayerSpec,
    composition_from_specs,
)
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.outcomes import RunOutcome
from agent_sessions.testing.fake_backend import FakeAgentBackend, FakeRun
from cache.errors import InvalidInput, RunEnded
from cache.records import (
    ClosedBy,
    LayerSpec,
    LifecycleState,
    Scope,
    SessionKey,
    SessionStatus,
    SessionWrite,
    Snapshot,
    SnapshotLayer,
)
from tests import factories as f
from tests.integration.support import (
    WorkerProcess,
    make_ctx,
    node_composition,
    pg_status,
    redis_status,
    row,
    run_node,
    stored,
    urgent_flush_queued,
    wait_for,
)
from tests.servers import Database
from workers.cleanup import (
    Cleaner,
    CleanupFailed,
    CleanupLease,
    cleanup_idempotency_key,
    cleanup_request,
)
from workers.context import WorkerContext
from workers.drain import drain

StartWorker = Callable[[WorkerContext], WorkerProcess]
RUN = "run-1"
TRAP = "layer names must match compositor layers in order"
KEPT_LAYERS = ["workflow_node_job_prompt", "execution_context", "history", "output"]
SESSIONS = [
    ("node-a", "binding-1", "agent-1"),
    ("node-b", "binding-2", "agent-1"),
    ("node-c", "binding-3", "agent-2"),
]
KEY_IDS = ("tenant_id", "workflow_run_id", "node_id", "binding_id", "agent_id")


@pytest.fixture
def ctx(
    redis_client: redis.Redis, redis_url: str, migrated: Database, fake: FakeAgentBackend
) -> WorkerContext:
    return make_ctx(redis_url, migrated.url, agent_backend_url=fake.url, cleanup_wait_s=10)


@pytest.fixture
def lc(ctx: WorkerContext) -> SessionLifecycle:
    return SessionLifecycle(ctx)


def scope_of(node: str, binding: str, agent: str, execution: int = 1) -> Scope:
    return f.scope(node=node, binding=binding, agent=agent, node_execution=f"{node}-{execution}")


def key_of(scope: Scope) -> SessionKey:
    assert scope.key is not None
    return scope.key


def seed(
    lc: SessionLifecycle, backend: AgentBackendClient, sessions: list[tuple[str, str, str]]
) -> dict[SessionKey, str]:
    """Two successful entries per session; returns each session's last backend run id."""
    last = {}
    for node, binding, agent in sessions:
        for execution in (1, 2):
            done = run_node(lc, backend, scope_of(node, binding, agent, execution))
            assert done.result.metadata["session_snapshot_persisted"] is True
        last[key_of(scope_of(node, binding, agent))] = done.status.run_id
    return last


def cleanup_runs(fake: FakeAgentBackend, key: SessionKey | None = None) -> list[FakeRun]:
    """Cleanup runs (of ``key``: its base idempotency key or a ``:retry-n`` form of it)."""
    runs = [run for run in fake.runs() if run.is_cleanup]
    if key is None:
        return runs
    base = cleanup_idempotency_key(key)
    return [run for run in runs if (run.request.idempotency_key or "").startswith(base)]


def cleanup_queued(ctx: WorkerContext, key: SessionKey) -> bool:
    """A cleanup job of ``key`` waits in the cleanup queue (its id names the session)."""
    digest = hashlib.sha1(ctx.cache.keys.session(key).encode()).hexdigest()[:16]
    return any(job_id.startswith(f"asc-cleanup-{digest}-") for job_id in ctx.cleanup_queue.job_ids)


def cleaner(ctx: WorkerContext, backend: AgentBackendClient | None, wait_s: float = 10) -> Cleaner:
    return Cleaner(ctx.cache, ctx.repo, backend, wait_s)


def flushed(ctx: WorkerContext) -> None:
    report = drain(ctx, timeout_s=30)
    assert report.drained and report.poisoned == 0


def all_cleaned(ctx: WorkerContext, keys: list[SessionKey]) -> bool:
    return all(
        redis_status(ctx, key) is SessionStatus.CLEANED
        and pg_status(ctx, key) is SessionStatus.CLEANED
        for key in keys
    )


def trap_snapshot(*names: str) -> Snapshot:
    return Snapshot(
        layers=tuple(
            SnapshotLayer(n, LifecycleState.SUSPENDED, {"messages": [n]} if n == "history" else {})
            for n in names
        )
    )


TRAP_SPECS = (
    LayerSpec("workflow_node_job_prompt", "plain.prompt", config={"prefix": "job"}),
    LayerSpec("execution_context", "dify.execution_context", config={"tenant_id": "tenant-1"}),
    LayerSpec("history", "pydantic_ai.history", metadata={"origin": "agent_session_history"}),
)


# ------------------------------------------------------------------ 6. fan-out


@pytest.mark.parametrize("outcome", ["succeeded", "partial_succeeded", "failed", "aborted"])
def test_every_terminal_workflow_outcome_moves_every_active_session_to_cleaning(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, outcome: str
) -> None:
    """A terminal outcome ends the run, moves each active session to cleaning, queues cleanups."""
    last = seed(lc, backend, SESSIONS)
    retired_scope = scope_of("node-d", "binding-4", "agent-1")
    run_node(lc, backend, retired_scope)
    failed = run_node(lc, backend, scope_of("node-d", "binding-4", "agent-1", 2), behaviour="fail")
    retired = stored(ctx, key_of(retired_scope))

    report = lc.workflow_ended("tenant-1", RUN, outcome)
    assert report.sessions == 4 and report.moved_to_cleaning == 3
    assert not report.already_ended
    state = ctx.cache.owner_state(f.run_ref())
    assert state["state"] == "ended" and state["outcome"] == outcome
    for key in last:
        record = stored(ctx, key)
        assert record.status is SessionStatus.CLEANING
        assert record.closed_by is ClosedBy.WORKFLOW_END
        assert record.version == 3
        assert cleanup_queued(ctx, key)
        assert not lc.enter(scope_of(key.node_id, key.binding_id, key.agent_id, 3)).resumable
    assert stored(ctx, key_of(retired_scope)) == retired  # a retired session is left alone
    assert retired.data.backend_run_id == failed.status.run_id
    shard = ctx.cache.keys.shard_of("tenant-1", RUN)
    assert urgent_flush_queued(ctx, shard)

    scope = scope_of("node-a", "binding-1", "agent-1", 3)
    entry = lc.enter(scope)
    request = lc.build_request(scope, entry, node_composition())
    late = RunOutcome("succeeded", "late", request, snapshot=f.snapshot())
    assert lc.finish(scope, entry, late).metadata["session_snapshot_persisted"] is False
    with pytest.raises(RunEnded):
        ctx.cache.save(key_of(scope), f.session_write())
    again = lc.workflow_ended("tenant-1", RUN, outcome)
    assert again.already_ended and again.moved_to_cleaning == 0


def test_workflow_end_fans_out_and_the_worker_cleans_every_session_on_the_backend(
    ctx: WorkerContext,
    lc: SessionLifecycle,
    backend: AgentBackendClient,
    fake: FakeAgentBackend,
    start_worker: StartWorker,
) -> None:
    """Every session gets one cleanup run (specs replayed, names aligned, delete) and is cleaned."""
    last = seed(lc, backend, SESSIONS)
    keys = list(last)
    specs = {key: stored(ctx, key).layer_specs for key in keys}
    start_worker(ctx)
    report = lc.workflow_ended("tenant-1", RUN, "succeeded")
    assert (report.sessions, report.moved_to_cleaning, report.cleanups_enqueued) == (3, 3, 3)
    wait_for(lambda: all_cleaned(ctx, keys), "every session cleaned in Redis and Postgres", 60)

    assert len(cleanup_runs(fake)) == 3
    for key in keys:
        (run,) = cleanup_runs(fake, key)
        request = run.request
        assert run.status == "succeeded"
        assert (
            request.idempotency_key
            == f"{RUN}:{key.node_id}:{key.binding_id}:{key.agent_id}:agent-session-cleanup"
        )
        assert request.on_exit.default == "delete"
        assert request.purpose == "workflow_node"
        assert list(request.composition.layer_names()) == KEPT_LAYERS
        assert request.composition.layers == [(s) for s in specs[key]]
        assert request.session_snapshot is not None
        assert request.session_snapshot.layer_names() == request.composition.layer_names()
        assert request.metadata["previous_agent_backend_run_id"] == last[key]
        assert request.metadata["agent_backend_lifecycle"] == "session_cleanup"
        assert tuple(request.metadata[name] for name in KEY_IDS) == key.parts()
        assert run.session_snapshot is not None
        assert {layer.lifecycle_state for layer in run.session_snapshot.layers} == {"closed"}
        for record in (stored(ctx, key), row(ctx, key)):
            assert record.status is SessionStatus.CLEANED
            assert record.data.backend_run_id == run.run_id
            assert record.cleanup_error is None and record.cleaned_at is not None
            assert record.closed_by is ClosedBy.WORKFLOW_END


def test_workflow_end_reaches_an_active_session_only_postgres_still_holds(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """An active row whose Redis keys expired is filled back, moved to cleaning and cleaned."""
    (key,) = seed(lc, backend, SESSIONS[:1])
    flushed(ctx)
    run = f.run_ref()
    ctx.cache.client.delete(
        ctx.cache.keys.session(key), ctx.cache.keys.owner(run), ctx.cache.keys.owner_sessions(run)
    )
    report = lc.workflow_ended("tenant-1", RUN, "failed")
    assert report.sessions == 1 and report.moved_to_cleaning == 1
    assert stored(ctx, key).status is SessionStatus.CLEANING
    assert stored(ctx, key).version == 3
    assert cleaner(ctx, ctx.backend).clean(key, last_attempt=False).outcome == "cleaned"
    flushed(ctx)
    assert row(ctx, key).status is SessionStatus.CLEANED and row(ctx, key).version == 4


def test_workflow_end_reaches_an_expired_session_still_listed_in_the_run(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """A session whose hash expired while the run's set still lists it is cleaned up too."""
    keys = list(seed(lc, backend, SESSIONS[:2]))
    flushed(ctx)
    ctx.cache.client.delete(ctx.cache.keys.session(keys[0]))  # only the hash is gone
    assert ctx.cache.owner_sessions(f.run_ref()) == sorted(keys, key=SessionKey.parts)
    report = lc.workflow_ended("tenant-1", RUN, "succeeded")
    assert report.sessions == 2 and report.moved_to_cleaning == 2
    assert all(stored(ctx, key).status is SessionStatus.CLEANING for key in keys)
    for key in keys:
        assert cleaner(ctx, ctx.backend).clean(key, last_attempt=False).outcome == "cleaned"
    flushed(ctx)
    assert all(row(ctx, key).status is SessionStatus.CLEANED for key in keys)


def test_sessions_differing_only_by_agent_each_get_their_own_cleanup_run(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, fake: FakeAgentBackend
) -> None:
    """Two agents of one node/binding are two sessions: each needs its own backend cleanup."""
    last = seed(
        lc, backend, [("node-1", "binding-1", "agent-1"), ("node-1", "binding-1", "agent-2")]
    )
    lc.workflow_ended("tenant-1", RUN, "succeeded")
    for key in last:
        assert cleaner(ctx, ctx.backend).clean(key, last_attempt=False).outcome == "cleaned"
    runs = cleanup_runs(fake)
    ids = {stored(ctx, key).data.backend_run_id for key in last}
    assert len(runs) == 2, "the second agent's cleanup was deduplicated into the first's run"
    assert len(ids) == 2
    assert {run.request.metadata["agent_id"] for run in runs} == {"agent-1", "agent-2"}


# --------------------------------------------------------------- 7. waiting, retries


def test_a_cleanup_lease_is_exclusive_and_released_cleanly(
    ctx: WorkerContext, caplog: pytest.LogCaptureFixture
) -> None:
    """One attempt at a time holds a session's lease; giving it up frees it for the next,
    without a warning (the lease shares the flush lock's scripts, not its free list)."""
    name = f"{ctx.settings.key_prefix}:cleanup_lease:probe"
    first = CleanupLease(ctx.queue_redis, name, "job-a", 5_000)
    second = CleanupLease(ctx.queue_redis, name, "job-b", 5_000)
    assert first.take() and not second.take()
    first.release()
    assert not ctx.queue_redis.exists(name)
    assert second.take()
    second.release()
    assert not ctx.queue_redis.exists(name)
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_cleanup_waits_for_the_backend_run_and_marks_cleaned_only_after_it_succeeded(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, fake: FakeAgentBackend
) -> None:
    """While the (slow) cleanup run is running the session stays cleaning; then it is cleaned."""
    (key,) = seed(lc, backend, SESSIONS[:1])
    lc.workflow_ended("tenant-1", RUN, "succeeded")
    fake.set_behaviour("slow:700", match_idempotency_prefix=cleanup_idempotency_key(key), times=1)
    results = []
    worker = threading.Thread(
        target=lambda: results.append(cleaner(ctx, ctx.backend).clean(key, last_attempt=False))
    )
    worker.start()
    seen_running = 0
    while worker.is_alive():
        status = redis_status(ctx, key)  # read before the run's status: if the run still
        runs = cleanup_runs(fake, key)  # runs after this read, it ran during it
        if runs and runs[0].status == "running":
            seen_running += 1
            assert status is SessionStatus.CLEANING
        worker.join(0.02)
    assert seen_running > 3
    (result,) = results
    (run,) = cleanup_runs(fake, key)
    assert run.status == "succeeded" and result.outcome == "cleaned"
    assert result.cleanup_run_id == run.run_id
    assert stored(ctx, key).status is SessionStatus.CLEANED
    assert stored(ctx, key).data.backend_run_id == run.run_id


def test_failed_cleanup_attempts_keep_the_session_cleaning_until_one_succeeds(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, fake: FakeAgentBackend
) -> None:
    """A failed cleanup run is retried (same key, new run); the first success cleans."""
    (key,) = seed(lc, backend, SESSIONS[:1])
    lc.workflow_ended("tenant-1", RUN, "succeeded")
    fake.fail_next_cleanups(2, error="snapshot mismatch")
    clean = cleaner(ctx, ctx.backend)
    for attempt in (1, 2):
        with pytest.raises(CleanupFailed, match="snapshot mismatch"):
            clean.clean(key, last_attempt=False)
        record = stored(ctx, key)
        assert record.status is SessionStatus.CLEANING and record.cleanup_error is None
        assert len(cleanup_runs(fake, key)) == attempt
    result = clean.clean(key, last_attempt=False)
    runs = cleanup_runs(fake, key)
    assert [run.status for run in runs] == ["failed", "failed", "succeeded"]
    assert result.outcome == "cleaned" and result.cleanup_run_id == runs[2].run_id
    record = stored(ctx, key)
    assert record.status is SessionStatus.CLEANED and record.cleanup_error is None
    assert record.data.backend_run_id == runs[2].run_id


def test_the_last_failed_cleanup_attempt_marks_cleaned_and_keeps_the_error(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, fake: FakeAgentBackend
) -> None:
    """When attempts run out the session is cleaned anyway, with the error kept (Redis and PG)."""
    last = seed(lc, backend, SESSIONS[:1])
    (key,) = last
    lc.workflow_ended("tenant-1", RUN, "aborted")
    fake.fail_next_cleanups(1, error="backend exploded")
    result = cleaner(ctx, ctx.backend).clean(key, last_attempt=True)
    assert result.outcome == "gave_up" and "backend exploded" in (result.error or "")
    flushed(ctx)
    for record in (stored(ctx, key), row(ctx, key)):
        assert record.status is SessionStatus.CLEANED
        assert "backend exploded" in (record.cleanup_error or "")
        assert record.data.backend_run_id == last[key]  # no cleanup run succeeded


@pytest.mark.parametrize("trouble", ["unreachable", "stalled"])
def test_a_backend_that_cannot_confirm_keeps_the_session_cleaning_until_the_last_attempt(
    ctx: WorkerContext,
    lc: SessionLifecycle,
    backend: AgentBackendClient,
    fake: FakeAgentBackend,
    trouble: str,
) -> None:
    """Transport errors and wait timeouts never clean a session before the last attempt."""
    (key,) = seed(lc, backend, SESSIONS[:1])
    lc.workflow_ended("tenant-1", RUN, "succeeded")
    if trouble == "unreachable":
        with FakeAgentBackend() as gone:
            url = gone.url
        client = AgentBackendClient(url, timeout_s=1, get_retries=0)
    else:
        fake.set_behaviour("stall", match_idempotency_prefix=cleanup_idempotency_key(key))
        client = AgentBackendClient(fake.url, timeout_s=1)
    with client:
        clean = cleaner(ctx, client, wait_s=0.3)
        for _ in range(2):
            with pytest.raises(CleanupFailed):
                clean.clean(key, last_attempt=False)
            assert stored(ctx, key).status is SessionStatus.CLEANING
        result = clean.clean(key, last_attempt=True)
    assert result.outcome == "gave_up"
    assert stored(ctx, key).status is SessionStatus.CLEANED
    assert stored(ctx, key).cleanup_error


def test_rq_retries_each_cleanup_and_one_bad_session_does_not_hold_the_others(
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    fake: FakeAgentBackend,
    backend: AgentBackendClient,
    start_worker: StartWorker,
) -> None:
    """Worker-level: a flaky cleanup is retried to success, a broken one gives up, others clean."""
    ctx = make_ctx(
        redis_url, migrated.url, agent_backend_url=fake.url, cleanup_attempts=2, cleanup_wait_s=5
    )
    lc = SessionLifecycle(ctx)
    last = seed(lc, backend, SESSIONS)
    good, flaky, bad = list(last)
    fake.set_behaviour(
        "fail:flaky once", match_idempotency_prefix=cleanup_idempotency_key(flaky), times=1
    )
    fake.set_behaviour(
        "fail:broken for good", match_idempotency_prefix=cleanup_idempotency_key(bad)
    )
    start_worker(ctx)
    lc.workflow_ended("tenant-1", RUN, "failed")
    wait_for(lambda: all_cleaned(ctx, [good, flaky, bad]), "all three sessions cleaned", 60)

    (good_run,) = cleanup_runs(fake, good)
    flaky_runs = cleanup_runs(fake, flaky)
    bad_runs = cleanup_runs(fake, bad)
    assert [r.status for r in flaky_runs] == ["failed", "succeeded"]
    assert [r.status for r in bad_runs] == ["failed", "failed"]  # exactly the two attempts
    for key, run_id in ((good, good_run.run_id), (flaky, flaky_runs[1].run_id)):
        for record in (stored(ctx, key), row(ctx, key)):
            assert record.data.backend_run_id == run_id and record.cleanup_error is None
    for record in (stored(ctx, bad), row(ctx, bad)):
        assert "broken for good" in (record.cleanup_error or "")
        assert record.data.backend_run_id == last[bad]


# ------------------------------------------------------------------ 8. local cleanup


def test_without_a_backend_the_worker_cleans_sessions_locally_without_http(
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    fake: FakeAgentBackend,
    backend: AgentBackendClient,
    start_worker: StartWorker,
) -> None:
    """No AGENT_BACKEND_URL: every session is cleaned locally, no request reaches a backend."""
    ctx = make_ctx(redis_url, migrated.url)
    assert ctx.settings.agent_backend_url is None and ctx.backend is None
    lc = SessionLifecycle(ctx)
    last = seed(lc, backend, SESSIONS)
    before = len(fake.runs())
    start_worker(ctx)
    lc.workflow_ended("tenant-1", RUN, "succeeded")
    wait_for(lambda: all_cleaned(ctx, list(last)), "local cleanup of every session", 60)
    assert len(fake.runs()) == before
    for key, previous in last.items():
        for record in (stored(ctx, key), row(ctx, key)):
            assert record.data.backend_run_id == previous  # kept: no cleanup run exists
            assert record.cleanup_error is None and record.cleaned_at is not None


def test_a_session_without_specs_is_cleaned_locally_without_http(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, fake: FakeAgentBackend
) -> None:
    """A session whose composition had only credential layers has no specs: no doomed request."""
    scope = scope_of("node-a", "binding-1", "agent-1")
    entry = lc.enter(scope)
    plugins_only = RunComposition(layers=[RunLayerSpec(name="llm", type="dify.plugin.llm")])
    request = lc.build_request(scope, entry, plugins_only, include_history=False)
    done = backend.wait_run(backend.create_run(request).run_id, timeout_s=10, poll_interval_s=0.01)
    lc.finish(scope, entry, RunOutcome.from_status(request, done))
    key = key_of(scope)
    assert stored(ctx, key).layer_specs == ()
    lc.workflow_ended("tenant-1", RUN, "succeeded")
    before = len(fake.runs())
    assert cleaner(ctx, ctx.backend).clean(key, last_attempt=False).outcome == "cleaned_locally"
    assert len(fake.runs()) == before
    assert stored(ctx, key).status is SessionStatus.CLEANED
    assert stored(ctx, key).data.backend_run_id == done.run_id


def test_cleanup_of_a_session_that_is_not_cleaning_is_skipped(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, fake: FakeAgentBackend
) -> None:
    """Cleanup touches only cleaning sessions: an active or missing one is skipped, no HTTP."""
    (key,) = seed(lc, backend, SESSIONS[:1])
    before, record = len(fake.runs()), stored(ctx, key)
    clean = cleaner(ctx, ctx.backend)
    assert clean.clean(key, last_attempt=True).outcome == "skipped"
    assert clean.clean(f.session_key(node="nope"), last_attempt=True).outcome == "skipped"
    assert stored(ctx, key) == record and len(fake.runs()) == before


def test_cleanup_reads_a_cleaning_session_through_from_postgres(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, fake: FakeAgentBackend
) -> None:
    """A cleaning session whose Redis key is gone is loaded from Postgres and still cleaned."""
    (key,) = seed(lc, backend, SESSIONS[:1])
    lc.workflow_ended("tenant-1", RUN, "succeeded")
    flushed(ctx)
    ctx.cache.client.delete(ctx.cache.keys.session(key))
    assert cleaner(ctx, ctx.backend).clean(key, last_attempt=False).outcome == "cleaned"
    flushed(ctx)
    (run,) = cleanup_runs(fake, key)
    assert row(ctx, key).status is SessionStatus.CLEANED and row(ctx, key).version == 4
    assert row(ctx, key).data.backend_run_id == run.run_id


# ------------------------------------------------------------------ 9. pause is no end


def test_a_workflow_pause_is_not_an_end_and_changes_nothing(
    ctx: WorkerContext,
    lc: SessionLifecycle,
    backend: AgentBackendClient,
    redis_client: redis.Redis,
) -> None:
    """workflow_ended refuses "paused" (and non-terminal or missing ids); sessions stay active."""
    last = seed(lc, backend, SESSIONS)
    before = f.redis_state(redis_client)
    for outcome in ("paused", "started", "running", "cancelled"):
        with pytest.raises(InvalidInput):
            lc.workflow_ended("tenant-1", RUN, outcome)
    with pytest.raises(InvalidInput):
        lc.workflow_ended("tenant-1", "", "succeeded")
    assert f.redis_state(redis_client) == before
    for key in last:
        assert stored(ctx, key).status is SessionStatus.ACTIVE
        assert lc.enter(scope_of(key.node_id, key.binding_id, key.agent_id, 3)).resumable


# ---------------------------------------------------------------------- 10. the trap


def test_a_cleanup_snapshot_whose_names_differ_from_the_composition_is_rejected(
    backend: AgentBackendClient,
) -> None:
    """The backend accepts the run, then fails it: snapshot names must equal the composition's."""
    composition = composition_from_specs(TRAP_SPECS)
    snapshot = CompositorSessionSnapshot(
        layers=[
            LayerSessionSnapshot(name=name, lifecycle_state="suspended", runtime_state={})
            for name in ("workflow_node_job_prompt", "execution_context", "history", "llm")
        ]
    )
    for sent in (composition, RunComposition(layers=[])):  # the "layers=[]" trap too
        request = CreateRunRequest(
            composition=sent,
            session_snapshot=snapshot,
            on_exit=LayerExitSignals(default="delete"),
        )
        created = backend.create_run(request)
        assert created.status == "running"  # accepted: validation happens inside the run
        done = backend.wait_run(created.run_id, timeout_s=10, poll_interval_s=0.01)
        assert done.status == "failed" and TRAP in (done.error or "")


@pytest.mark.parametrize(
    "snapshot_layers",
    [
        ("workflow_node_job_prompt", "execution_context", "history", "llm"),
        ("llm", "history", "execution_context", "workflow_node_job_prompt"),
        ("history", "llm"),
    ],
    ids=["extra-llm", "reordered", "missing-layers"],
)
def test_our_cleanup_request_always_matches_names_and_the_backend_accepts_it(
    ctx: WorkerContext,
    lc: SessionLifecycle,
    fake: FakeAgentBackend,
    snapshot_layers: tuple[str, ...],
) -> None:
    """A stored snapshot out of line with its specs is aligned, so the cleanup run succeeds."""
    key = f.session_key()
    snapshot = trap_snapshot(*snapshot_layers)
    ctx.cache.save(
        key, SessionWrite.for_scope(f.scope(), snapshot, TRAP_SPECS, backend_run_id="prev")
    )
    lc.workflow_ended("tenant-1", RUN, "succeeded")
    request = cleanup_request(stored(ctx, key))
    names = [spec.name for spec in TRAP_SPECS]
    assert list(request.composition.layer_names()) == names
    assert request.session_snapshot is not None
    assert list(request.session_snapshot.layer_names()) == names
    history = request.session_snapshot.decoded().layers[names.index("history")]
    assert history.runtime_state == {"messages": ["history"]}  # state kept, not reset
    result = cleaner(ctx, ctx.backend).clean(key, last_attempt=False)
    (run,) = cleanup_runs(fake, key)
    assert run.status == "succeeded" and run.error is None
    assert result.outcome == "cleaned" and stored(ctx, key).data.backend_run_id == run.run_id
