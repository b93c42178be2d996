"""The worker pool's processes: how a worker stops, how the pool supervises its children,
how it stops as a whole, and what happens to the work its processes held."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from rq import Queue, Worker
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from agent_backend.client import AgentBackendClient
from agent_sessions.audit import audit
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.testing.fake_backend import FakeAgentBackend
from agent_sessions.testing.worker_process import WorkerProcess
from cache.records import SessionKey, SessionStatus
from persistence.migrate import head
from tests import factories as f
from tests.integration.support import (
    group_gone_within,
    make_ctx,
    run_node,
    settings_env,
    wait_for,
)
from tests.servers import Database, free_port, pid_alive
from workers.cleanup import cleanup_idempotency_key
from workers.context import WorkerContext
from workers.drain import drain
from workers.pool import SessionWorker

STOP_BOUND_S = 10.0
"""Every process of the pool exits within this long of a stop signal (README, Worker pool)."""
CLEANUP_ITSELF_S = 15.0
"""What a bound leaves for the cleanup itself: a pool's start, a job, the backend run."""


def test_a_worker_stops_its_pubsub_thread_even_after_the_thread_saw_the_unsubscribe(
    redis_client: redis.Redis,
) -> None:
    """RQ 3.0's pub/sub thread waits 60 s per poll, and a worker's teardown joins it with no
    bound: when the thread reads the UNSUBSCRIBE reply before the stop flag is cleared (what
    a loaded machine does), it goes back to a 60 s wait and the worker's stop waits with it.
    The order is forced here; the worker must still stop at once."""
    queue = Queue("pool-test", connection=redis_client, serializer=JSONSerializer)
    worker = SessionWorker([queue], connection=redis_client, name="pool-test-worker")
    worker.subscribe()
    assert worker.pubsub is not None and worker.pubsub_thread is not None
    worker.pubsub.unsubscribe()
    wait_for(lambda: not worker.pubsub.subscribed, "the thread to read the unsubscribe reply", 10)
    stopping = threading.Thread(target=worker.unsubscribe, daemon=True)
    stopping.start()
    stopping.join(STOP_BOUND_S)
    assert not stopping.is_alive(), "the worker's teardown still waits on its pub/sub thread"
    assert not worker.pubsub_thread.is_alive()


# ------------------------------------------------------------------------ the pool as a process


@pytest.fixture
def ctx(redis_client: redis.Redis, redis_url: str, migrated: Database) -> WorkerContext:
    return make_ctx(redis_url, migrated.url)


@pytest.fixture
def pools(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``agent-sessions worker`` pools (own process group, log file); all are killed
    at the end of the test."""
    started: list[WorkerProcess] = []

    def start(ctx: WorkerContext, processes: int = 1) -> WorkerProcess:
        pool = WorkerProcess(ctx.settings, processes, log=tmp_path / f"pool-{len(started)}.log")
        started.append(pool)
        return pool

    yield start
    for pool in started:
        pool.kill()


def trigger_pid(ctx: WorkerContext, other_than: int | None = None) -> int:
    """The pid of a live flush trigger of ``ctx``'s prefix (other than ``other_than``)."""
    found: list[int] = []

    def passed() -> bool:
        pids = [int(name.rpartition(":")[2]) for name in ctx.cache.trigger_passes()]
        found[:] = [pid for pid in pids if pid != other_than and pid_alive(pid)]
        return bool(found)

    wait_for(passed, "a flush trigger to pass", 30)
    return found[0]


def worker_pids(ctx: WorkerContext, count: int) -> list[int]:
    found: list[int] = []

    def registered() -> bool:
        workers = Worker.all(queue=ctx.flush_queue, serializer=JSONSerializer)
        found[:] = [w.pid for w in workers if w.pid and pid_alive(w.pid)]
        return len(found) == count and all(w.get_state() == "idle" for w in workers)

    wait_for(registered, f"{count} idle RQ workers", 30)
    return found


def saved(ctx: WorkerContext, n: int, run: str = "run-1") -> list[SessionKey]:
    keys = [f.session_key(run=run, node=f"node-{i}") for i in range(n)]
    for key in keys:
        ctx.cache.save(key, f.session_write())
    return keys


def flushed(ctx: WorkerContext, keys: list[SessionKey]) -> bool:
    return all(ctx.repo.get(key) is not None for key in keys)


def stop_group(pool: WorkerProcess, sig: signal.Signals = signal.SIGTERM) -> float:
    """Signal the pool's whole process group, as systemd's default KillMode does; the
    seconds until every process of it is gone (fails past the bound)."""
    started = time.monotonic()
    os.killpg(pool.proc.pid, sig)
    assert group_gone_within(pool.proc, STOP_BOUND_S), pool.tail(40)
    return time.monotonic() - started


def test_a_killed_flush_trigger_is_started_again_and_flushing_goes_on(
    ctx: WorkerContext, pools: Callable[..., WorkerProcess]
) -> None:
    """Before, a killed trigger was never restarted: saves stayed dirty until a manual flush."""
    pool = pools(ctx)
    first = trigger_pid(ctx)
    os.kill(first, signal.SIGKILL)
    second = trigger_pid(ctx, other_than=first)
    keys = saved(ctx, 5)
    wait_for(lambda: flushed(ctx, keys), "saves made after the kill to reach Postgres", 30)
    assert ctx.cache.counters()["restarts_flush_trigger"] == 1
    assert f"flush-trigger (pid {first}) was killed by SIGKILL; starting it again" in pool.tail(200)
    assert [int(n.rpartition(":")[2]) for n in ctx.cache.trigger_passes()] == [second]
    assert audit(ctx).faults == 0


def test_a_killed_worker_is_started_again_and_rq_forgets_the_dead_one(
    ctx: WorkerContext, pools: Callable[..., WorkerProcess]
) -> None:
    pool = pools(ctx, 2)
    victim, survivor = worker_pids(ctx, 2)
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: victim not in worker_pids(ctx, 2) and survivor in worker_pids(ctx, 2),
        "a new worker in place of the killed one",
        30,
    )
    names = [w.name for w in Worker.all(queue=ctx.flush_queue, serializer=JSONSerializer)]
    assert all(name.split(":")[0] == socket.gethostname() for name in names)
    assert not any(name.split(":")[1] == str(victim) for name in names)
    assert ctx.cache.counters()["restarts_worker"] == 1
    assert f"(pid {victim}) was killed by SIGKILL; starting it again" in pool.tail(200)
    keys = saved(ctx, 3)
    wait_for(lambda: flushed(ctx, keys), "saves to reach Postgres", 30)
    assert audit(ctx).faults == 0


def test_a_process_that_keeps_crashing_stops_the_pool_with_one_line_and_status_1(
    ctx: WorkerContext, pools: Callable[..., WorkerProcess]
) -> None:
    """A crash is an end the process came to by itself (SIGSEGV here); SIGKILLs from outside
    are always answered with a restart (the test above, and the delivery tests' ten kills)."""
    pool = pools(ctx)
    pid = None
    for _ in range(5):
        pid = trigger_pid(ctx, other_than=pid)
        os.kill(pid, signal.SIGSEGV)
    assert pool.proc.wait(timeout=30) == 1
    assert group_gone_within(pool.proc, STOP_BOUND_S)
    lines = [line for line in pool.tail(400).splitlines() if "stopping the pool" in line]
    assert len(lines) == 1, pool.tail(60)
    assert "flush-trigger ended 5 times within 60s" in lines[0] and "SIGSEGV" in lines[0]


@pytest.mark.parametrize("target", ["group", "leader"])
def test_sigterm_stops_an_idle_pool_within_the_bound(
    ctx: WorkerContext, pools: Callable[..., WorkerProcess], target: str
) -> None:
    """To the whole process group (systemd's default KillMode, a terminal's Ctrl-C) or to
    the pool's pid alone: every process is gone within the bound, exit status 0."""
    pool = pools(ctx, 2)
    worker_pids(ctx, 2)
    trigger_pid(ctx)
    if target == "group":
        stop_group(pool)
    else:
        os.kill(pool.proc.pid, signal.SIGTERM)
        assert group_gone_within(pool.proc, STOP_BOUND_S), pool.tail(40)
    assert pool.proc.wait(timeout=1) == 0
    assert not Worker.all(queue=ctx.flush_queue, serializer=JSONSerializer)
    assert ctx.cache.trigger_passes() == {}


@contextmanager
def table_locked(ctx: WorkerContext) -> Iterator[None]:
    """Every flush blocks in Postgres until the block ends (a lock held by another client)."""
    with ctx.repo.engine.connect() as conn:
        conn.execute(sa.text("LOCK TABLE agent_runtime_sessions IN ACCESS EXCLUSIVE MODE"))
        yield
        conn.rollback()


def flush_blocked(ctx: WorkerContext) -> bool:
    """A flush job runs (started in RQ) while the table is locked."""
    return bool(StartedJobRegistry(queue=ctx.flush_queue).get_job_ids())


def unacknowledged(ctx: WorkerContext, key: SessionKey) -> bool:
    record = ctx.cache.load(key).record
    return record is not None and record.dirty


def test_a_pool_stuck_in_a_flush_stops_within_the_bound_and_acknowledges_nothing(
    ctx: WorkerContext, pools: Callable[..., WorkerProcess]
) -> None:
    (key,) = saved(ctx, 1)
    with table_locked(ctx):
        pool = pools(ctx)
        wait_for(lambda: flush_blocked(ctx), "a flush to block on the locked table", 30)
        took = stop_group(pool)
        assert took > 2, "the flush was not really blocked"
        assert unacknowledged(ctx, key)
    # the killed flush's statement may still commit once the lock goes: harmless, the
    # next flush finds it applied and acknowledges it
    assert drain(ctx, timeout_s=30).drained and ctx.repo.get(key) is not None
    assert not unacknowledged(ctx, key)
    assert audit(ctx).faults == 0


def test_a_second_signal_kills_the_pool_at_once(
    ctx: WorkerContext, pools: Callable[..., WorkerProcess]
) -> None:
    saved(ctx, 1)
    with table_locked(ctx):
        pool = pools(ctx)
        wait_for(lambda: flush_blocked(ctx), "a flush to block on the locked table", 30)
        os.kill(pool.proc.pid, signal.SIGTERM)
        time.sleep(1.0)
        assert pool.alive(), "the blocked flush should hold the first stop"
        started = time.monotonic()
        os.kill(pool.proc.pid, signal.SIGTERM)
        assert group_gone_within(pool.proc, STOP_BOUND_S)
        assert time.monotonic() - started < 3, "the second signal did not kill at once"


# ------------------------------------------------------------------------ cleanups and stops


@pytest.fixture
def cleaning_ctx(
    redis_client: redis.Redis, redis_url: str, migrated: Database, fake: FakeAgentBackend
) -> WorkerContext:
    return make_ctx(
        redis_url,
        migrated.url,
        agent_backend_url=fake.url,
        reconcile_grace_s=1,
        reconcile_interval_s=2,
        cleanup_wait_s=4,
    )


def seeded(ctx: WorkerContext, backend: AgentBackendClient, nodes: int) -> list[SessionKey]:
    """Sessions with layer specs (their cleanup is a backend run), flushed."""
    lifecycle = SessionLifecycle(ctx)
    keys = []
    for i in range(nodes):
        done = run_node(lifecycle, backend, f.scope(node=f"node-{i}"))
        assert done.result.metadata["session_snapshot_persisted"] is True
        keys.append(f.scope(node=f"node-{i}").key)
    assert drain(ctx, timeout_s=30).drained
    return [key for key in keys if key is not None]


def cleanup_runs_of(fake: FakeAgentBackend, key: SessionKey) -> list[str]:
    base = cleanup_idempotency_key(key)
    return [
        run.status
        for run in fake.runs()
        if run.is_cleanup and (run.request.idempotency_key or "").startswith(base)
    ]


def all_cleaned(ctx: WorkerContext, keys: list[SessionKey]) -> bool:
    records = [ctx.cache.load(key).record for key in keys]
    rows = [ctx.repo.get(key) for key in keys]
    return all(
        r is not None and r.status is SessionStatus.CLEANED and not r.dirty for r in records
    ) and all(r is not None and r.status is SessionStatus.CLEANED for r in rows)


def test_a_cleanup_killed_mid_flight_is_finished_by_the_next_pool_within_the_bound(
    cleaning_ctx: WorkerContext,
    fake: FakeAgentBackend,
    backend: AgentBackendClient,
    pools: Callable[..., WorkerProcess],
) -> None:
    """Before, RQ took the killed job as alive until its timeout + 60 s (378 s measured)."""
    ctx = cleaning_ctx
    keys = seeded(ctx, backend, 3)
    fake.set_behaviour("slow:3000", match_idempotency_prefix=f"{f.RUN}:")
    first = pools(ctx)
    worker_pids(ctx, 1)
    SessionLifecycle(ctx).workflow_ended(f.TENANT, f.RUN, "succeeded")
    wait_for(lambda: any(cleanup_runs_of(fake, k) for k in keys), "a cleanup run to start", 30)
    first.kill()  # SIGKILL, mid-cleanup: nothing gets to clean up after itself
    started = time.monotonic()
    pools(ctx)
    settings = ctx.settings
    bound = settings.reconcile_grace_s + 2 * settings.reconcile_interval_s + settings.cleanup_wait_s
    wait_for(lambda: all_cleaned(ctx, keys), "every session cleaned", bound + 60)
    took = time.monotonic() - started
    assert took < bound + CLEANUP_ITSELF_S, f"cleaned after {took:.1f}s; bound {bound}s"
    for key in keys:  # the killed attempt's run was asked again, not duplicated
        assert cleanup_runs_of(fake, key) == ["succeeded"], cleanup_runs_of(fake, key)
    assert audit(ctx).faults == 0


def test_a_stopping_pool_hands_its_running_cleanup_back_and_the_next_pool_finishes_it(
    cleaning_ctx: WorkerContext,
    fake: FakeAgentBackend,
    backend: AgentBackendClient,
    pools: Callable[..., WorkerProcess],
) -> None:
    """Busy with a cleanup that waits on the backend, the pool still stops within the
    bound (group SIGTERM); the cleanup is queued again and the next pool finishes it at
    once, asking the run it remembered instead of starting another."""
    ctx = cleaning_ctx
    (key,) = seeded(ctx, backend, 1)
    fake.set_behaviour("slow:6000", match_idempotency_prefix=f"{f.RUN}:")
    first = pools(ctx)
    worker_pids(ctx, 1)
    SessionLifecycle(ctx).workflow_ended(f.TENANT, f.RUN, "succeeded")
    wait_for(lambda: cleanup_runs_of(fake, key) == ["running"], "the cleanup run to start", 30)
    stop_group(first)
    assert ctx.cache.counters()["cleanups_handed_back"] == 1
    assert len(ctx.cleanup_queue.job_ids) == 1  # queued again for the next pool
    record = ctx.cache.load(key).record
    assert record is not None and record.status is SessionStatus.CLEANING
    started = time.monotonic()
    pools(ctx)
    wait_for(lambda: all_cleaned(ctx, [key]), "the session cleaned by the next pool", 60)
    assert time.monotonic() - started < ctx.settings.reconcile_grace_s + CLEANUP_ITSELF_S
    assert cleanup_runs_of(fake, key) == ["succeeded"]
    assert audit(ctx).faults == 0


# ------------------------------------------------------------------------ start-up checks


def start_pool(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_sessions", "worker", "-n", "1", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def refused(result: subprocess.CompletedProcess[str], says: str) -> None:
    """Exit status 2, no traceback, and the last stderr line is the one that says why."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert says in result.stderr.strip().splitlines()[-1], result.stderr


@pytest.fixture
def env(redis_client: redis.Redis, redis_url: str, database_url: Database) -> dict[str, str]:
    """A configuration whose database exists but was never migrated."""
    return settings_env(make_ctx(redis_url, database_url.url)) | {"ASC_LOG_LEVEL": "WARNING"}


def test_a_pool_on_an_unmigrated_database_says_run_migrate(env: dict[str, str]) -> None:
    """Before, the trigger logged a traceback every pass (UndefinedTable)."""
    refused(start_pool(env), f"this build needs {head()}: run `agent-sessions migrate`")


def test_a_pool_on_a_missing_database_says_how_to_create_it(env: dict[str, str]) -> None:
    missing = env["DATABASE_URL"].rsplit("/", 1)[0] + "/asc_no_such_database"
    result = start_pool(env | {"DATABASE_URL": missing})
    refused(result, "database 'asc_no_such_database' does not exist")
    assert "createdb" in result.stderr and "agent-sessions services up" in result.stderr


@pytest.mark.parametrize("url", ["DATABASE_URL", "REDIS_URL", "RQ_REDIS_URL"])
def test_a_pool_whose_service_does_not_answer_says_which(env: dict[str, str], url: str) -> None:
    port = free_port()
    dead = {
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/x",
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "RQ_REDIS_URL": f"redis://127.0.0.1:{port}/0",
    }[url]
    refused(start_pool(env | {url: dead}), f"{url} ")
    assert "does not answer" in start_pool(env | {url: dead}).stderr


def test_a_pool_whose_metrics_port_is_taken_says_so(
    env: dict[str, str], migrated: Database
) -> None:
    """Before, a 40-line traceback from the metrics thread."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = start_pool(
            env | {"DATABASE_URL": migrated.url}, "--metrics-port", str(port), "--burst"
        )
    refused(result, f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}")


def test_a_pool_without_a_backend_warns_once_that_cleanups_stay_local(
    env: dict[str, str], migrated: Database
) -> None:
    result = start_pool(env | {"DATABASE_URL": migrated.url}, "--burst")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "AGENT_BACKEND_URL" in line]
    assert len(warnings) == 1 and "cleanups only mark sessions cleaned" in warnings[0]
