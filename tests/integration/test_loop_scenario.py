"""A workflow loop re-entering one Agent node 100 times, end to end.

One session (the loop shares it: only ``node_execution_id`` changes per iteration), a real
``agent-sessions worker`` flushing behind the loop and cleaning up at the end, and the loopback
fake backend running every iteration: a failure at iteration 37, a workflow pause at 60.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from agent_backend.client import AgentBackendClient
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.testing.fake_backend import FakeAgentBackend
from cache.records import SessionStatus
from tests import factories as f
from tests.integration.support import (
    NodeRun,
    WorkerProcess,
    history_of,
    make_ctx,
    pg_status,
    redis_status,
    row,
    run_node,
    stored,
    wait_for,
)
from tests.servers import Database
from workers.cleanup import cleanup_idempotency_key
from workers.context import WorkerContext
from workers.drain import drain

ITERATIONS = 100
FAIL_AT = 37
PAUSE_AT = 60
RUN = "run-loop"
KEY = f.session_key(run=RUN)


def _check_iteration(i: int, done: NodeRun, previous: NodeRun | None) -> None:
    """What each iteration must show: fresh after the failure, continued everywhere else."""
    messages = history_of(done.status.session_snapshot)
    if i <= FAIL_AT:
        assert len(messages) == i + 1, i
    else:
        assert len(messages) == i - FAIL_AT, i  # restarted at 38
    if i == FAIL_AT + 1:
        assert done.entry.snapshot is None and done.request.session_snapshot is None
        assert messages[0]["run"] == done.status.run_id  # type: ignore[index]
    elif i > 0:
        assert previous is not None
        assert done.request.session_snapshot == previous.status.session_snapshot, i
    assert done.request.idempotency_key == f"{RUN}:exec-{i:03d}"


def _wait_until_in_postgres(ctx: WorkerContext, version: int) -> None:
    """The paused session must be durable before the (possibly days-long) pause begins."""

    def landed() -> bool:
        found = ctx.repo.get(KEY)
        return found is not None and found.version >= version

    wait_for(landed, "the paused session in Postgres before the workflow resumes", 30)


def test_a_100_iteration_loop_survives_a_failure_and_a_pause_and_ends_cleaned_everywhere(
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    fake: FakeAgentBackend,
    backend: AgentBackendClient,
    start_worker: Callable[[WorkerContext], WorkerProcess],
) -> None:
    """Failure → fresh history; pause → resumed history; version = stores; end → all cleaned."""
    ctx = make_ctx(redis_url, migrated.url, agent_backend_url=fake.url, cleanup_wait_s=10)
    lc = SessionLifecycle(ctx)
    start_worker(ctx)
    fake.set_behaviour(
        "fail:loop body exploded", match_idempotency_prefix=f"{RUN}:exec-{FAIL_AT:03d}", times=1
    )
    stores = 0
    previous: NodeRun | None = None
    for i in range(ITERATIONS):
        scope = f.scope(run=RUN, node_execution=f"exec-{i:03d}")
        done = run_node(lc, backend, scope, behaviour="pause" if i == PAUSE_AT else None)
        stores += 1  # a save, or (at FAIL_AT) a retire
        assert done.result.version == stores, (i, done.result)
        if i == FAIL_AT:
            assert done.status.status == "failed" and done.result.status == "failed"
            assert done.result.error == "loop body exploded"
            assert stored(ctx, KEY).status is SessionStatus.CLEANED
            previous = None
            continue
        _check_iteration(i, done, previous)
        if i == PAUSE_AT:
            assert done.result.status == "paused" and done.result.pause is not None
            _wait_until_in_postgres(ctx, stores)
        else:
            assert done.result.status == "completed", (i, done.result)
        previous = done

    final = stored(ctx, KEY)
    assert final.version == stores == ITERATIONS
    assert final.status is SessionStatus.ACTIVE
    assert len(history_of(final.snapshot)) == ITERATIONS - 1 - FAIL_AT

    report = lc.workflow_ended("tenant-1", RUN, "succeeded")
    assert report.sessions == 1 and report.moved_to_cleaning == 1
    wait_for(
        lambda: (
            redis_status(ctx, KEY) is SessionStatus.CLEANED
            and pg_status(ctx, KEY) is SessionStatus.CLEANED
        ),
        "the loop's session cleaned in Redis and Postgres",
        60,
    )
    assert drain(ctx, timeout_s=30).drained
    (cleanup,) = [run for run in fake.runs() if run.is_cleanup]
    assert cleanup.request.idempotency_key == cleanup_idempotency_key(KEY)
    assert cleanup.status == "succeeded"
    assert cleanup.request.session_snapshot is not None
    assert len(history_of(cleanup.request.session_snapshot)) == ITERATIONS - 1 - FAIL_AT
    for record in (stored(ctx, KEY), row(ctx, KEY)):
        assert record.status is SessionStatus.CLEANED
        assert record.version == ITERATIONS + 2  # begin_cleanup + mark_cleaned
        assert record.data.backend_run_id == cleanup.run_id
        assert record.cleanup_error is None
    assert len(fake.runs()) == ITERATIONS + 1
