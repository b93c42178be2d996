"""The node contract end to end: SessionLifecycle over real Redis, Postgres, RQ and the fake.

Every Agent-node entry here is driven like a workflow engine drives it (``run_node``: enter →
build_request → ``POST /runs`` on the loopback fake → wait → finish), and every claim about
Postgres is checked after a real flush (``drain``) or a real worker process.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import msgspec
import psycopg
import pytest
import redis

from agent_backend.client import AgentBackendClient
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.outcomes import STORE_ERROR, Entry, NodeResult, RunOutcome
from agent_sessions.testing.fake_agent import HUMAN_INPUT_PAUSE, SCRIPTED_PAUSE
from cache.errors import InvalidInput
from cache.records import ClosedBy, Scope, SessionKey, SessionStatus
from tests import factories as f
from tests.integration.support import (
    CREDENTIAL_LAYERS,
    WorkerProcess,
    history_of,
    make_ctx,
    node_composition,
    pg_status,
    redis_status,
    row,
    row_count,
    rows_of,
    run_node,
    stored,
    urgent_flush_queued,
    wait_for,
)
from tests.servers import Database, RedisServer
from workers.cleanup import Cleaner
from workers.context import WorkerContext
from workers.drain import drain

TABLE = "agent_runtime_sessions"
KEY = f.session_key()
SENT_LAYERS = (
    "workflow_node_job_prompt",
    "execution_context",
    "history",
    "llm",
    "tools",
    "core_tools",
    "output",
)
KEPT_LAYERS = ["workflow_node_job_prompt", "execution_context", "history", "output"]
SCOPE_IDS = (
    "tenant_id",
    "app_id",
    "workflow_id",
    "workflow_run_id",
    "node_id",
    "node_execution_id",
    "binding_id",
    "agent_id",
    "agent_config_snapshot_id",
)

StartWorker = Callable[[WorkerContext], WorkerProcess]


@pytest.fixture
def ctx(redis_client: redis.Redis, redis_url: str, migrated: Database) -> WorkerContext:
    return make_ctx(redis_url, migrated.url)


@pytest.fixture
def lc(ctx: WorkerContext) -> SessionLifecycle:
    return SessionLifecycle(ctx)


def at(execution: int, **kwargs: str) -> Scope:
    """The scope of one entry: the node execution id changes on every loop iteration."""
    return f.scope(node_execution=f"exec-{execution}", **kwargs)


def flushed(ctx: WorkerContext) -> None:
    report = drain(ctx, timeout_s=30)
    assert report.drained and report.poisoned == 0


def run_ids(messages: list[object]) -> list[object]:
    return [m["run"] for m in messages]  # type: ignore[index]


# ---------------------------------------------------------------------- 1. success


def test_success_saves_snapshot_and_credential_free_specs_and_the_next_entry_resumes_it(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """A success stores the run's snapshot and replayable specs; the next entry continues it."""
    first = run_node(lc, backend, at(1))
    assert first.entry == Entry(version=0) and not first.entry.resumable
    assert first.request.session_snapshot is None
    assert first.result.status == "completed" and first.result.version == 1
    assert first.result.metadata == {"session_snapshot_persisted": True}
    assert first.request.composition.layer_names() == SENT_LAYERS

    record = stored(ctx, KEY)
    expected_specs = tuple(
        (layer) for layer in first.request.composition.layers if layer.name not in CREDENTIAL_LAYERS
    )
    assert [spec.name for spec in record.layer_specs] == KEPT_LAYERS
    assert record.layer_specs == expected_specs
    assert "secret" not in repr(record.layer_specs)
    assert record.status is SessionStatus.ACTIVE
    assert record.snapshot == (first.status.session_snapshot)  # type: ignore[arg-type]
    assert record.data.backend_run_id == first.status.run_id

    second = run_node(lc, backend, at(2))
    assert second.entry.resumable and second.entry.version == 1
    assert second.entry.snapshot == record.snapshot
    assert second.entry.layer_specs == expected_specs
    assert second.entry.backend_run_id == first.status.run_id
    assert second.request.session_snapshot == first.status.session_snapshot
    assert second.result.version == 2

    resumed = lc.enter(at(3))
    assert run_ids(history_of(resumed.snapshot)) == [first.status.run_id, second.status.run_id]

    flushed(ctx)
    saved = row(ctx, KEY)
    assert row_count(ctx.repo) == 1
    assert saved.status is SessionStatus.ACTIVE and saved.version == 2
    assert saved.cleaned_at is None and saved.closed_by is None
    assert saved.snapshot == resumed.snapshot
    assert saved.layer_specs == expected_specs
    assert saved.data.backend_run_id == second.status.run_id
    assert saved.data.node_execution_id == "exec-2"
    assert rows_of(ctx.repo, "tenant-1", "run-1", SessionStatus.ACTIVE) == [saved]


def test_build_request_threads_the_snapshot_suspends_on_exit_and_names_every_scope_id(
    lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """The request carries the stored snapshot, suspend-on-exit, the run key and all scope ids."""
    run_node(lc, backend, at(1))
    scope = at(2)
    entry = lc.enter(scope)
    assert entry.snapshot is not None
    first = lc.build_request(scope, entry, node_composition())
    retry = lc.build_request(scope, entry, node_composition(), attempt=3, metadata={"x": 1})
    assert first.on_exit.default == "suspend" and first.on_exit.layers == {}
    assert first.purpose == "workflow_node"
    assert first.idempotency_key == "run-1:exec-2"
    assert retry.idempotency_key == "run-1:exec-2:retry-3"
    assert first.session_snapshot == (entry.snapshot)
    for name in SCOPE_IDS:
        assert first.metadata[name] == getattr(scope, name), name
    assert retry.metadata["x"] == 1
    without = lc.build_request(scope, entry, node_composition(), include_history=False)
    assert "history" not in without.composition.layer_names()
    assert without.session_snapshot is not None
    assert without.session_snapshot.layer_names() == without.composition.layer_names()
    with pytest.raises(InvalidInput):
        lc.build_request(scope, entry, node_composition(), attempt=-1)


def test_a_retry_attempt_resumes_the_previous_attempts_snapshot_under_its_own_key(
    lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """Intra-node retry: attempt n+1 re-enters, resumes attempt n's save, and uses a new key."""
    attempt0 = run_node(lc, backend, at(1))
    attempt1 = run_node(lc, backend, at(1), attempt=1)
    assert attempt1.request.idempotency_key == "run-1:exec-1:retry-1"
    assert attempt1.status.run_id != attempt0.status.run_id  # not deduplicated by the backend
    assert attempt1.entry.version == 1
    assert attempt1.request.session_snapshot == attempt0.status.session_snapshot
    assert len(history_of(attempt1.status.session_snapshot)) == 2


# -------------------------------------------------------------------- 2. retirement


@pytest.mark.parametrize(("behaviour", "ended"), [("fail", "failed"), ("cancel", "cancelled")])
def test_a_failed_or_cancelled_run_retires_the_session_and_the_next_entry_starts_fresh(
    ctx: WorkerContext,
    lc: SessionLifecycle,
    backend: AgentBackendClient,
    behaviour: str,
    ended: str,
) -> None:
    """Failure/cancel: node failed, session cleaned with the failed run id; then a fresh start."""
    run_node(lc, backend, at(1))
    bad = run_node(lc, backend, at(2), behaviour=behaviour)
    assert bad.status.status == ended
    assert bad.result.status == "failed" and bad.result.error
    assert bad.result.metadata["session_snapshot_cleaned_on_failure"] is True
    assert bad.result.version == 2

    retired = stored(ctx, KEY)
    assert retired.status is SessionStatus.CLEANED
    assert retired.data.backend_run_id == bad.status.run_id
    assert retired.closed_by is ClosedBy.BACKEND_FAILURE and retired.cleaned_at
    flushed(ctx)
    retired_row = row(ctx, KEY)
    assert retired_row.status is SessionStatus.CLEANED and retired_row.version == 2
    assert retired_row.data.backend_run_id == bad.status.run_id
    assert retired_row.cleaned_at is not None
    assert rows_of(ctx.repo, "tenant-1", "run-1", SessionStatus.ACTIVE) == []
    assert rows_of(ctx.repo, "tenant-1", "run-1") == [retired_row]

    fresh = run_node(lc, backend, at(3))
    assert fresh.entry.snapshot is None and fresh.entry.version == 2
    assert fresh.request.session_snapshot is None
    assert run_ids(history_of(fresh.status.session_snapshot)) == [fresh.status.run_id]
    assert fresh.result.status == "completed" and fresh.result.version == 3

    revived = stored(ctx, KEY)
    assert revived.status is SessionStatus.ACTIVE
    assert revived.cleaned_at is None and revived.closed_by is None
    assert revived.data.backend_run_id == fresh.status.run_id
    flushed(ctx)
    assert row(ctx, KEY).status is SessionStatus.ACTIVE
    assert row(ctx, KEY).version == 3
    assert row_count(ctx.repo) == 1


def test_nothing_to_store_writes_nothing(
    ctx: WorkerContext, lc: SessionLifecycle, redis_client: redis.Redis
) -> None:
    """A success without a snapshot saves nothing; a failure without a session retires nothing."""
    scope = at(1)
    entry = lc.enter(scope)
    request = lc.build_request(scope, entry, node_composition())
    no_snapshot = RunOutcome("succeeded", "run-a", request, snapshot=None)
    failed = RunOutcome("failed", "run-b", request, error="boom")
    assert lc.finish(scope, entry, no_snapshot) == NodeResult("completed")
    result = lc.finish(scope, entry, failed)
    assert result.status == "failed" and result.error == "boom" and result.version is None
    assert result.metadata == {"session_snapshot_cleaned_on_failure": True}
    run = ctx.cache.keys.owner(f.run_ref()).encode()  # enter's read-through: "open", per Postgres
    assert set(redis_client.keys("*")) == {b"asc:meta", run}
    assert redis_client.hget(run, "state") == b"open" and int(redis_client.pttl(run)) > 0
    assert row_count(ctx.repo) == 0


# ------------------------------------------------------------------ 3. pause, human input


def test_a_pause_saves_flushes_urgently_and_requests_a_workflow_pause(
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    backend: AgentBackendClient,
    start_worker: StartWorker,
) -> None:
    """A paused run is saved, reaches Postgres at once (not after flush_delay), pauses the flow."""
    ctx = make_ctx(redis_url, migrated.url, flush_delay_ms=3_600_000)
    lc = SessionLifecycle(ctx)
    start_worker(ctx)
    run_node(lc, backend, at(1))  # a normal save: stays in Redis for the hour-long delay
    paused = run_node(lc, backend, at(2), behaviour="pause")
    assert paused.status.status == "paused"
    assert paused.result.status == "paused" and paused.result.version == 2
    assert paused.result.pause is not None
    assert paused.result.pause.reason == SCRIPTED_PAUSE
    assert not paused.result.pause.human_input
    assert paused.result.pause.pending_form_id is None
    assert paused.result.metadata == {
        "session_snapshot_persisted": True,
        "session_flush": "enqueued",
        "session_flush_enqueued": True,
    }
    wait_for(lambda: ctx.repo.get(KEY) is not None, "the urgent flush of the pause", 30)
    saved = row(ctx, KEY)
    assert saved.status is SessionStatus.ACTIVE and saved.version == 2
    assert saved.snapshot == (paused.status.session_snapshot)  # type: ignore[arg-type]
    assert [spec.name for spec in saved.layer_specs] == KEPT_LAYERS
    assert saved.data.backend_run_id == paused.status.run_id

    resumed = run_node(lc, backend, at(3))
    assert resumed.request.session_snapshot == paused.status.session_snapshot
    assert len(history_of(resumed.status.session_snapshot)) == 3


def test_human_input_keeps_the_pending_form_and_tool_call_until_the_next_success(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """An ask_human pause stores both pending ids; enter returns them; a success clears them."""
    asked = run_node(lc, backend, at(1), behaviour="human_input", pending_form_id="form-1")
    call_id = f"call-{asked.status.run_id}"
    assert asked.result.status == "paused" and asked.result.pause is not None
    assert asked.result.pause.human_input
    assert asked.result.pause.reason == HUMAN_INPUT_PAUSE
    assert asked.result.pause.pending_form_id == "form-1"
    assert asked.result.pause.pending_tool_call_id == call_id
    assert asked.result.metadata["session_flush_enqueued"] is True
    shard = ctx.cache.keys.shard_of_key(KEY)
    assert urgent_flush_queued(ctx, shard)

    entry = lc.enter(at(2))
    assert entry.resumable
    assert (entry.pending_form_id, entry.pending_tool_call_id) == ("form-1", call_id)
    flushed(ctx)
    assert row(ctx, KEY).data.pending_form_id == "form-1"
    assert row(ctx, KEY).data.pending_tool_call_id == call_id

    answered = run_node(lc, backend, at(2), entry=entry)
    assert answered.result.status == "completed"
    cleared = lc.enter(at(3))
    assert cleared.pending_form_id is None and cleared.pending_tool_call_id is None
    flushed(ctx)
    assert row(ctx, KEY).data.pending_form_id is None
    assert row(ctx, KEY).data.pending_tool_call_id is None


def test_a_pause_saved_while_an_urgent_flush_of_its_shard_runs_still_lands_urgently(
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    backend: AgentBackendClient,
    start_worker: StartWorker,
) -> None:
    """A second pause during a running urgent flush of the shard still reaches Postgres at once."""
    ctx = make_ctx(redis_url, migrated.url, flush_delay_ms=3_600_000, shards=1, flush_lock_ttl_s=30)
    lc = SessionLifecycle(ctx)
    first, second = at(1, node="node-a"), at(1, node="node-b")
    blocker = psycopg.connect(migrated.url)
    try:
        blocker.execute(f"LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE")  # the flush hangs here
        start_worker(ctx)
        run_node(lc, backend, first, behaviour="pause", entry=Entry(version=0))
        lock = ctx.cache.keys.flush_lock(0)
        wait_for(lambda: bool(ctx.cache.client.exists(lock)), "the first urgent flush to run", 30)
        late = run_node(lc, backend, second, behaviour="pause", entry=Entry(version=0))
        assert late.result.metadata["session_snapshot_persisted"] is True
    finally:
        blocker.rollback()
        blocker.close()
    assert first.key is not None and second.key is not None
    wait_for(lambda: ctx.repo.get(first.key) is not None, "the first pause in Postgres", 30)  # type: ignore[arg-type]
    wait_for(
        lambda: ctx.repo.get(second.key) is not None,  # type: ignore[arg-type]
        "the second pause in Postgres (flush_delay is an hour: only an urgent flush helps)",
        15,
    )


# --------------------------------------------------------------- 4. store failures


def test_a_save_refused_after_the_run_ended_is_reported_not_raised(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """A save the store refuses gives persisted=False and the store error code, no exception."""
    run_node(lc, backend, at(1))
    entry = lc.enter(at(2))
    lc.workflow_ended("tenant-1", "run-1", "succeeded")
    for execution, behaviour, status in ((2, None, "completed"), (3, "pause", "paused")):
        late = run_node(lc, backend, at(execution), behaviour=behaviour, entry=entry)
        assert late.result.status == status
        assert late.result.metadata["session_snapshot_persisted"] is False
        assert late.result.metadata["session_snapshot_persist_error"] == STORE_ERROR
        assert "has ended" in str(late.result.metadata["session_store_error_detail"])
        assert not late.result.conflict and late.result.version is None
    assert stored(ctx, KEY).status is SessionStatus.CLEANING


def test_redis_down_is_reported_in_the_node_metadata_never_raised(
    ctx: WorkerContext,
    lc: SessionLifecycle,
    backend: AgentBackendClient,
    redis_server: RedisServer,
) -> None:
    """With Redis down, success/pause/failure finish normally and report the store error."""
    run_node(lc, backend, at(1))
    scope = at(2)
    entry = lc.enter(scope)
    outcomes = {}
    for behaviour in ("succeed", "pause", "fail"):
        request = lc.build_request(
            scope, entry, node_composition(), metadata={"fake_behaviour": behaviour}
        )
        request = msgspec.structs.replace(request, idempotency_key=f"exec-2-{behaviour}")
        created = backend.create_run(request)
        done = backend.wait_run(created.run_id, timeout_s=10, poll_interval_s=0.01)
        outcomes[behaviour] = RunOutcome.from_status(request, done)
    redis_server.stop()
    try:
        saved = lc.finish(scope, entry, outcomes["succeed"])
        paused = lc.finish(scope, entry, outcomes["pause"])
        failed = lc.finish(scope, entry, outcomes["fail"])
    finally:
        redis_server.start()
    # the first save went to a connection that was open when Redis stopped: it was sent and
    # no reply came, so whether it was applied is unknown; the next could not even connect
    assert saved.metadata["session_snapshot_persisted"] is None
    assert paused.metadata["session_snapshot_persisted"] is False
    for result in (saved, paused):
        assert result.metadata["session_snapshot_persist_error"] == STORE_ERROR
        assert "unavailable" in str(result.metadata["session_store_error_detail"])
    assert saved.status == "completed" and paused.status == "paused"
    assert paused.pause is not None
    assert failed.status == "failed" and failed.error
    assert failed.metadata["session_snapshot_cleaned_on_failure"] is False
    assert failed.metadata["session_snapshot_cleanup_error"] == STORE_ERROR


# ------------------------------------------------------------------ 5. no run id


def test_without_a_workflow_run_id_the_lifecycle_is_a_complete_no_op(
    ctx: WorkerContext,
    lc: SessionLifecycle,
    backend: AgentBackendClient,
    redis_client: redis.Redis,
) -> None:
    """No workflow_run_id: fresh entries, no session metadata, nothing in Redis or Postgres."""
    cases = [
        (None, "completed"),
        ("pause", "paused"),
        ("human_input", "paused"),
        ("fail", "failed"),
        ("cancel", "failed"),
    ]
    for i, (behaviour, status) in enumerate(cases):
        scope = f.scope(run=None, node_execution=f"exec-{i}")
        assert lc.enter(scope) == Entry()
        done = run_node(lc, backend, scope, behaviour=behaviour, pending_form_id="form-1")
        assert done.request.idempotency_key == f"exec-{i}"
        assert done.request.session_snapshot is None
        assert done.request.metadata["workflow_run_id"] is None
        assert done.result.status == status, behaviour
        assert done.result.version is None and not done.result.conflict
        assert not [k for k in done.result.metadata if k.startswith("session_")], behaviour
    assert set(redis_client.keys("*")) == {b"asc:meta"}
    assert row_count(ctx.repo) == 0


# ------------------------------------------------------------------ 12. racing the end


def _outcome(lc: SessionLifecycle, scope: Scope, entry: Entry, i: int) -> RunOutcome:
    request = lc.build_request(scope, entry, node_composition())
    if i % 7 == 3:
        return RunOutcome("failed", f"failed-{i}", request, error="boom")
    snapshot = f.snapshot("history", state={"i": i, "node": scope.node_id})
    return RunOutcome("succeeded", f"ok-{i}", request, snapshot=snapshot)


class _Race:
    """Node threads doing enter/finish on many sessions of one run while the run ends."""

    THREADS, PER_THREAD, ITERATIONS = 4, 4, 12

    def __init__(self, ctx: WorkerContext, lc: SessionLifecycle, run: str) -> None:
        self.ctx, self.lc, self.run = ctx, lc, run
        self.scopes = [
            [f.scope(run=run, node=f"node-{t}-{s}") for s in range(self.PER_THREAD)]
            for t in range(self.THREADS)
        ]
        self.ended = threading.Event()
        self.late: list[NodeResult] = []
        self.failures: list[BaseException] = []
        self.lock = threading.Lock()

    def finish_once(self, scope: Scope, i: int, *, late: bool) -> None:
        entry = self.lc.enter(scope)
        outcome = _outcome(self.lc, scope, entry, i)
        result = self.lc.finish(scope, entry, outcome)
        if late and outcome.status == "succeeded":
            with self.lock:
                self.late.append(result)

    def node_loop(self, mine: list[Scope]) -> None:
        try:
            for i in range(self.ITERATIONS):
                for scope in mine:
                    self.finish_once(scope, i, late=self.ended.is_set())
            self.ended.wait(30)
            for scope in mine:  # at least one finish per thread after the end
                self.finish_once(scope, 0, late=True)
        except BaseException as exc:  # surfaced by the main thread
            self.failures.append(exc)

    def end_when_busy(self) -> None:
        try:
            target = random.randint(1, self.THREADS * self.PER_THREAD)
            run_ref = f.run_ref(run=self.run)
            wait_for(lambda: len(self.ctx.cache.owner_sessions(run_ref)) >= target, "saves", 30)
            self.lc.workflow_ended("tenant-1", self.run, "succeeded")
        except BaseException as exc:
            self.failures.append(exc)
        finally:
            self.ended.set()

    def go(self) -> None:
        threads = [threading.Thread(target=self.node_loop, args=(m,)) for m in self.scopes]
        threads.append(threading.Thread(target=self.end_when_busy))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not self.failures, self.failures

    def session_keys(self) -> list[SessionKey]:
        return [scope.key for mine in self.scopes for scope in mine if scope.key is not None]


def _race_once(ctx: WorkerContext, lc: SessionLifecycle, run: str) -> None:
    race = _Race(ctx, lc, run)
    race.go()
    assert race.late
    for result in race.late:
        assert result.metadata["session_snapshot_persisted"] is False, result
        assert "has ended" in str(result.metadata["session_store_error_detail"])

    flushed(ctx)
    cleaner = Cleaner(ctx.cache, ctx.repo, None, wait_s=5)
    for key in ctx.cache.owner_sessions(f.run_ref(run=run)):
        cleaner.clean(key, last_attempt=True)
    flushed(ctx)
    for key in race.session_keys():
        in_redis, in_pg = redis_status(ctx, key), pg_status(ctx, key)
        assert in_redis in (None, SessionStatus.CLEANED), key
        assert in_pg == in_redis, key
    assert not rows_of(ctx.repo, "tenant-1", run, SessionStatus.ACTIVE)
    assert not rows_of(ctx.repo, "tenant-1", run, SessionStatus.CLEANING)


def test_saves_racing_workflow_ended_never_leave_an_active_session_anywhere(
    ctx: WorkerContext, lc: SessionLifecycle
) -> None:
    """Enter/finish racing workflow_ended: every late save is refused, nothing stays active."""
    for round_ in range(10):
        _race_once(ctx, lc, f"race-{round_}")


# ------------------------------------------------------------ 13. tenant isolation


def test_tenants_with_identical_ids_never_see_each_others_sessions(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """Same run/node/binding/agent ids in two tenants: enter, end and listing stay per tenant."""
    a1, a2 = at(1, tenant="tenant-a"), at(2, tenant="tenant-a")
    b1, b2 = at(3, tenant="tenant-b"), at(4, tenant="tenant-b")
    key_a, key_b = a1.key, b1.key
    assert key_a is not None and key_b is not None
    run_node(lc, backend, a1)
    run_node(lc, backend, a2)
    fresh_b = run_node(lc, backend, b1)
    assert fresh_b.entry == Entry(version=0)
    assert len(history_of(lc.enter(a2).snapshot)) == 2
    assert len(history_of(lc.enter(b2).snapshot)) == 1

    report = lc.workflow_ended("tenant-a", "run-1", "failed")
    assert report.sessions == 1 and report.moved_to_cleaning == 1
    assert redis_status(ctx, key_a) is SessionStatus.CLEANING
    assert redis_status(ctx, key_b) is SessionStatus.ACTIVE
    assert lc.enter(b2).resumable and not lc.enter(a2).resumable
    assert run_node(lc, backend, b2).result.metadata["session_snapshot_persisted"] is True

    flushed(ctx)
    assert [s.key for s in rows_of(ctx.repo, "tenant-a", "run-1")] == [key_a]
    assert [s.key for s in rows_of(ctx.repo, "tenant-b", "run-1")] == [key_b]
    assert rows_of(ctx.repo, "tenant-b", "run-1")[0].status is SessionStatus.ACTIVE
    assert rows_of(ctx.repo, "tenant-a", "run-1")[0].status is SessionStatus.CLEANING


def test_ids_that_join_to_the_same_text_stay_separate_sessions(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """Tenant "t" run "x:y" and tenant "t:x" run "y" share a shard, never a session or a run."""
    left = at(1, tenant="t", run="x:y")
    right = at(2, tenant="t:x", run="y")
    assert left.key is not None and right.key is not None
    assert ctx.cache.keys.shard_of_key(left.key) == ctx.cache.keys.shard_of_key(right.key)
    run_node(lc, backend, left)
    assert lc.enter(right) == Entry(version=0)
    run_node(lc, backend, right)
    assert lc.workflow_ended("t", "x:y", "succeeded").sessions == 1
    assert redis_status(ctx, right.key) is SessionStatus.ACTIVE
    flushed(ctx)
    assert [s.key for s in rows_of(ctx.repo, "t", "x:y")] == [left.key]
    assert [s.key for s in rows_of(ctx.repo, "t:x", "y")] == [right.key]


# ----------------------------------------------------------------- 14. version conflict


def test_two_concurrent_entries_of_one_session_cannot_overwrite_each_other(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """Two entries read one version; the second finish conflicts and the first save stays."""
    for existing in (False, True):
        scope_a, scope_b = at(10 + existing), at(20 + existing)
        entry_a, entry_b = lc.enter(scope_a), lc.enter(scope_b)
        assert entry_a.version == entry_b.version
        a = run_node(lc, backend, scope_a, entry=entry_a)
        b = run_node(lc, backend, scope_b, entry=entry_b)
        assert a.result.conflict is False and a.result.version == entry_a.version + 1  # type: ignore[operator]
        assert b.result.conflict is True and b.result.status == "completed"
        assert b.result.version is None
        assert b.result.metadata["session_snapshot_persisted"] is False
        assert b.result.metadata["session_snapshot_persist_error"] == "version_conflict"
        record = stored(ctx, KEY)
        assert record.version == a.result.version
        assert record.snapshot == (a.status.session_snapshot)  # type: ignore[arg-type]
        assert record.data.backend_run_id == a.status.run_id


def test_a_paused_entry_that_lost_the_race_still_pauses_and_reports_the_conflict(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """A conflicting pause still asks for a workflow pause and says it did not persist."""
    entry = lc.enter(at(1))
    run_node(lc, backend, at(1), entry=entry)
    lost = run_node(lc, backend, at(2), behaviour="pause", entry=entry)
    assert lost.result.status == "paused" and lost.result.conflict
    assert lost.result.metadata["session_snapshot_persist_error"] == "version_conflict"
    assert stored(ctx, KEY).version == 1


# ------------------------------------------------------------------- 15. read-through


def test_enter_reads_through_to_postgres_after_the_redis_key_is_gone(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """A Redis miss returns Postgres's snapshot and version; the next save is version+1, clean."""
    run_node(lc, backend, at(1))
    last = run_node(lc, backend, at(2))
    flushed(ctx)
    ctx.cache.client.delete(ctx.cache.keys.session(KEY))
    entry = lc.enter(at(3))
    assert entry.resumable and entry.version == 2
    assert entry.snapshot == row(ctx, KEY).snapshot
    assert entry.snapshot == (last.status.session_snapshot)  # type: ignore[arg-type]
    assert entry.backend_run_id == last.status.run_id
    resumed = run_node(lc, backend, at(3), entry=entry)
    assert resumed.result.version == 3 and not resumed.result.conflict
    assert len(history_of(resumed.status.session_snapshot)) == 3
    flushed(ctx)
    assert ctx.cache.poison(ctx.cache.keys.shard_of_key(KEY)) == {}
    assert row(ctx, KEY).version == 3


def test_a_failure_after_the_redis_hash_expired_retires_the_postgres_session(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """A retire that finds no hash reads Postgres first: the failed session never resumes."""
    run_node(lc, backend, at(1))
    flushed(ctx)
    entry = lc.enter(at(2))
    ctx.cache.client.delete(ctx.cache.keys.session(KEY))  # expired while the run was running
    bad = run_node(lc, backend, at(2), entry=entry, behaviour="fail")
    assert bad.result.metadata["session_snapshot_cleaned_on_failure"] is True
    assert bad.result.version == 2
    flushed(ctx)
    assert row(ctx, KEY).status is SessionStatus.CLEANED
    assert not lc.enter(at(3)).resumable


def test_enter_of_a_cleaned_session_read_through_from_postgres_starts_fresh(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """A retired row read back from Postgres is not resumable but keeps its version."""
    run_node(lc, backend, at(1))
    run_node(lc, backend, at(2), behaviour="fail")
    flushed(ctx)
    ctx.cache.client.delete(ctx.cache.keys.session(KEY))
    entry = lc.enter(at(3))
    assert entry == Entry(version=2)
    assert run_node(lc, backend, at(3), entry=entry).result.version == 3
