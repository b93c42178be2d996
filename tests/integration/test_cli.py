"""Every ``agent-sessions`` command, run as a subprocess against real Redis and Postgres."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.testing.worker_process import WorkerProcess
from cache.records import Owner, SessionKey, SessionStatus
from persistence.migrate import current
from tests import factories as f
from tests.integration.support import (
    group_gone_within,
    make_ctx,
    settings_env,
    wait_for,
)
from tests.servers import Database, RedisServer, free_port
from workers.context import WorkerContext

COMMANDS = [
    "demo",
    "worker",
    "flush",
    "migrate",
    "inspect",
    "stats",
    "health",
    "cleanup",
    "services",
    "poison",
]


@pytest.fixture
def ctx(redis_client: object, redis_url: str, database_url: Database) -> WorkerContext:
    return make_ctx(redis_url, database_url.url)


def cli(ctx: WorkerContext, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "agent_sessions", *args],
        env=settings_env(ctx),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(f"agent-sessions {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def json_out(ctx: WorkerContext, *args: str) -> dict[str, object]:
    """The command's JSON object, less the ``using`` field every one carries (checked)."""
    data = json.loads(cli(ctx, *args, "--json").stdout.strip().splitlines()[-1])
    assert data.pop("using")["key_prefix"] == ctx.settings.key_prefix
    return data  # type: ignore[no-any-return]


def migrate(ctx: WorkerContext) -> None:
    cli(ctx, "migrate")


def saved(ctx: WorkerContext, n: int, run: str = "run-1") -> list[SessionKey]:
    keys = [f.session_key(run=run, node=f"node-{i}") for i in range(n)]
    for key in keys:
        ctx.cache.save(key, f.session_write())
    return keys


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself_with_help(ctx: WorkerContext, command: str) -> None:
    """Every command has a --help that says what it does."""
    result = cli(ctx, command, "--help")
    assert "Usage:" in result.stdout and len(result.stdout.splitlines()) > 4


BAD_CONFIGURATION = [
    ({"ASC_SHARDS": "0"}, "ASC_SHARDS:"),
    ({"ASC_SHARDS": "abc"}, "ASC_SHARDS:"),
    ({"DATABASE_URL": "postgresql://u@h:notaport/db"}, "DATABASE_URL: has an invalid port"),
    ({"DATABASE_URL": "mysql://u@h/db"}, "DATABASE_URL: must be a postgresql"),
    ({"REDIS_URL": "foo://h"}, "REDIS_URL: must be a redis/rediss/unix URL"),
    ({"RQ_REDIS_URL": "redis://h:xx/0"}, "RQ_REDIS_URL: has an invalid port"),
    ({"AGENT_BACKEND_URL": "localhost:8000"}, "AGENT_BACKEND_URL: must be a http/https URL"),
    ({"ASC_FLUSH_BATCH": "10000"}, "lower ASC_FLUSH_BATCH"),
    ({"ASC_SHARDS": "7"}, "ConfigurationError: asc:meta says shards=4"),
]


@pytest.mark.parametrize(("env", "says"), BAD_CONFIGURATION, ids=[s for _, s in BAD_CONFIGURATION])
def test_every_configuration_error_is_one_line_and_exit_2(
    ctx: WorkerContext, env: dict[str, str], says: str
) -> None:
    saved(ctx, 1)  # the key space exists, with its shard count
    bad = subprocess.run(
        [sys.executable, "-m", "agent_sessions", "stats"],
        env={**settings_env(ctx), **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2, bad.stderr
    assert says in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_bad_arguments_give_one_line_errors(ctx: WorkerContext) -> None:
    """Bad input is one line on stderr with exit status 2, never a traceback."""
    bad_flag = cli(ctx, "flush", "--nonsense", check=False)
    assert bad_flag.returncode == 2 and "Traceback" not in bad_flag.stderr
    bad_id = cli(ctx, "inspect", "session", "t", "r", "n", "b", "x" * 300, check=False)
    assert bad_id.returncode == 2 and "InvalidId" in bad_id.stderr
    assert len(bad_id.stderr.strip().splitlines()) == 1


def test_migrate_brings_a_fresh_database_to_head(ctx: WorkerContext) -> None:
    """`migrate` creates the schema; running it again is a no-op."""
    assert current(ctx.settings.database_url) is None
    first = cli(ctx, "migrate")
    assert "revision" in first.stdout
    assert current(ctx.settings.database_url) is not None
    cli(ctx, "migrate")


def test_flush_wait_drains_everything_and_reports_it(ctx: WorkerContext) -> None:
    """`flush --wait` writes every dirty session to Postgres before it returns."""
    migrate(ctx)
    keys = saved(ctx, 12)
    report = json_out(ctx, "flush", "--wait")
    assert report == {"drained": True, "written": 12, "poisoned": 0, "left": 0, "parked": 0}
    assert all(ctx.repo.get(key) is not None for key in keys)


def test_flush_wait_with_threads_drains_in_threads(ctx: WorkerContext) -> None:
    migrate(ctx)
    keys = saved(ctx, 20)
    report = json_out(ctx, "flush", "--wait", "--threads", "3")
    assert report == {"drained": True, "written": 20, "poisoned": 0, "left": 0, "parked": 0}
    assert all(ctx.repo.get(key) is not None for key in keys)


def test_flush_threads_without_wait_is_a_usage_error_that_queues_nothing(
    ctx: WorkerContext,
) -> None:
    saved(ctx, 2)
    result = cli(ctx, "flush", "--threads", "2", check=False)
    assert result.returncode == 2
    assert "--threads applies to --wait only" in result.stderr
    assert ctx.flush_queue.count == 0


def test_flush_without_wait_queues_urgent_jobs_a_worker_runs(ctx: WorkerContext) -> None:
    """`flush` queues one urgent job per dirty shard; `worker` runs them."""
    migrate(ctx)
    keys = saved(ctx, 5)
    report = json_out(ctx, "flush")
    assert report["dirty"] == 5 and report["enqueued"] == report["shards"]
    assert ctx.flush_queue.count == report["enqueued"]
    cli(ctx, "worker", "-n", "1", "--burst")
    assert all(ctx.repo.get(key) is not None for key in keys)


@pytest.mark.parametrize(("level", "shown"), [("INFO", True), ("WARNING", False)])
def test_worker_prints_its_start_up_advice_at_the_configured_level(
    ctx: WorkerContext, level: str, shown: bool
) -> None:
    """The store's start-up checks reach the operator: `worker` logs at ASC_LOG_LEVEL."""
    migrate(ctx)
    with RedisServer() as server:  # Redis' default: hash-max-listpack-value 64
        env = settings_env(ctx) | {"ASC_LOG_LEVEL": level}
        env |= {"REDIS_URL": server.url, "RQ_REDIS_URL": server.url}
        result = subprocess.run(
            [sys.executable, "-m", "agent_sessions", "worker", "-n", "1", "--burst"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    advice = [line for line in result.stderr.splitlines() if "hash-max-listpack-value 64" in line]
    assert bool(advice) is shown, result.stderr
    if shown:
        assert "cache.server_checks INFO:" in advice[0]


def test_worker_serves_prometheus_metrics(ctx: WorkerContext) -> None:
    """`worker --metrics-port` exposes the backlog gauges and the pool's counters."""
    migrate(ctx)
    saved(ctx, 3)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_sessions", "worker", "-n", "1", "--metrics-port", str(port)],
        env={k: v for k, v in settings_env(ctx).items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _scrape(port) is not None, "the metrics endpoint", 30)
        wait_for(lambda: "asc_flush_rows_total 3.0" in (_scrape(port) or ""), "flushed rows", 30)
        body = _scrape(port) or ""
        assert "asc_dirty_sessions 0.0" in body
        assert "asc_dirty_oldest_age_seconds" in body and "asc_poison_sessions 0.0" in body
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            return str(answer.read().decode())
    except OSError:
        return None


def test_inspect_session_shows_both_sides_and_the_decoded_snapshot(ctx: WorkerContext) -> None:
    """`inspect session` shows status, versions, dirtiness, TTL and the snapshot's layers."""
    migrate(ctx)
    key = f.session_key(run="run/1")
    ctx.cache.save(key, f.session_write(f.snapshot("prompt", "history", state={"n": 1})))
    args = ("inspect", "session", *key.parts())
    dirty = json_out(ctx, *args)
    assert dirty["redis"]["dirty"] is True and dirty["redis"]["ttl_s"] is None  # type: ignore[index]
    assert dirty["postgres"] is None
    layers = dirty["redis"]["snapshot"]["layers"]  # type: ignore[index]
    assert [layer["name"] for layer in layers] == ["prompt", "history"]
    cli(ctx, "flush", "--wait")
    clean = json_out(ctx, *args, "--full")
    assert clean["redis"]["dirty"] is False and clean["redis"]["ttl_s"] > 0  # type: ignore[index]
    assert clean["postgres"]["version"] == 1  # type: ignore[index]
    assert clean["postgres"]["snapshot"]["snapshot"]["layers"][0]["runtime_state"] == {"n": 1}  # type: ignore[index]
    text = cli(ctx, *args).stdout
    assert "status: active" in text and "run%2F1" in text
    missing = cli(ctx, "inspect", "session", "t", "nope", "n", "b", "a", check=False)
    assert missing.returncode == 1 and "no session" in missing.stderr


def test_inspect_run_lists_every_session_on_both_sides(ctx: WorkerContext) -> None:
    """`inspect run` shows the run's state and each session in Redis and Postgres."""
    migrate(ctx)
    saved(ctx, 3)
    cli(ctx, "flush", "--wait")
    ctx.cache.end_owner(Owner(f.TENANT, "run-1"), "succeeded")
    report = json_out(ctx, "inspect", "run", f.TENANT, "run-1")
    assert report["run"]["state"] == "ended"  # type: ignore[index]
    sessions = report["sessions"]
    assert isinstance(sessions, list) and len(sessions) == 3
    assert all(s["redis"]["version"] == s["postgres"]["version"] == 1 for s in sessions)


def test_inspect_conversation_and_its_session_show_both_sides(ctx: WorkerContext) -> None:
    """`inspect conversation-session` / `inspect conversation` cover a conversation's sessions;
    their names say the owner, and `stats` counts sessions per owner."""
    migrate(ctx)
    turn = f.conversation_scope(conversation="chat 1", config="config-7")
    chat = turn.key
    ctx.cache.save(chat, f.session_write(f.snapshot("history", state={"turn": 3}), of=turn))
    saved(ctx, 1)
    cli(ctx, "flush", "--wait")
    one = json_out(ctx, "inspect", "conversation-session", *chat.parts(), "--full")
    assert one["owner_type"] == "conversation"
    assert str(one["key"]).split(":")[2:] == [
        "conversation-session",
        f.TENANT,
        "chat%201",
        "binding-1",
        "agent-1",
        "config-7",
    ]
    assert one["redis"]["version"] == one["postgres"]["version"] == 1  # type: ignore[index]
    assert one["postgres"]["snapshot"]["snapshot"]["layers"][0]["runtime_state"] == {"turn": 3}  # type: ignore[index]
    owner = json_out(ctx, "inspect", "conversation", f.TENANT, "chat 1")
    assert owner["run"]["state"] == "open"  # type: ignore[index]
    assert owner["run"]["config:binding-1:agent-1"] == "config-7"  # type: ignore[index]
    (session,) = owner["sessions"]  # type: ignore[misc]
    assert session["agent_config_snapshot_id"] == "config-7" and "node_id" not in session
    stats = json_out(ctx, "stats")
    assert stats["postgres_sessions_by_owner"] == {
        "conversation": {"active": 1},
        "workflow_run": {"active": 1},
    }
    missing = cli(ctx, "inspect", "conversation", f.TENANT, "nobody", check=False)
    assert missing.returncode == 1 and "no conversation" in missing.stderr


def test_stats_reports_backlog_poison_statuses_and_queues(ctx: WorkerContext) -> None:
    """`stats` shows the dirty backlog, its oldest age, poison with reasons and queue depths."""
    migrate(ctx)
    saved(ctx, 4)
    before = json_out(ctx, "stats")
    assert before["dirty_total"] == 4 and before["oldest_dirty_age_s"] is not None
    shard = ctx.cache.keys.shard_of_key(f.session_key(run="run-1"))
    ctx.cache.quarantine(
        shard, "asc:{s000}:session:a:b:c:d:e", 1, "postgres refused: test", force=True
    )
    assert cli(ctx, "flush", "--wait", check=False).returncode == 1  # one parked session
    after = json_out(ctx, "stats")
    assert after["dirty_total"] == 0 and after["oldest_dirty_age_s"] is None
    assert after["poison"] == {"asc:{s000}:session:a:b:c:d:e": "v1: postgres refused: test"}
    assert after["postgres_sessions_by_status"] == {"active": 4}
    assert set(after["queues"]) == {"asc-flush", "asc-cleanup"}  # type: ignore[arg-type]
    assert after["counters"]["rows_flushed"] == 4  # type: ignore[index]
    assert "dirty_total: 0" in cli(ctx, "stats").stdout


def test_cleanup_list_and_retry(ctx: WorkerContext) -> None:
    """`cleanup list` shows waiting and given-up cleanups; `retry` re-queues waiting ones."""
    migrate(ctx)
    lifecycle = SessionLifecycle(ctx)
    keys = saved(ctx, 3)
    lifecycle.workflow_ended(f.TENANT, "run-1", "failed")
    ctx.cleanup_queue.empty()  # the queue's jobs are lost, as after a queue-Redis flush
    cli(ctx, "flush", "--wait")
    ctx.cache.mark_cleaned(keys[0], error="cleanup gave up: backend down")
    cli(ctx, "flush", "--wait")
    listed = json_out(ctx, "cleanup", "list")
    assert len(listed["waiting"]) == 2  # type: ignore[arg-type]
    assert list(listed["given_up"].values()) == ["cleanup gave up: backend down"]  # type: ignore[union-attr]
    retried = cli(ctx, "cleanup", "retry")
    assert "cleanup jobs queued: 2" in retried.stdout
    cli(ctx, "worker", "-n", "1", "--burst")
    cli(ctx, "flush", "--wait")
    statuses = {ctx.repo.get(key).status for key in keys}  # type: ignore[union-attr]
    assert statuses == {SessionStatus.CLEANED}


def test_services_status_reports_what_answers(ctx: WorkerContext) -> None:
    """`services status` reports the Redis and Postgres it would use."""
    result = cli(ctx, "services", "status")
    assert "redis" in result.stdout.lower() and "postgres" in result.stdout.lower()


def test_services_up_and_down_leave_answering_servers_alone(ctx: WorkerContext) -> None:
    """`services up` uses servers that answer (starting nothing); `down` stops nothing of theirs."""
    up = cli(ctx, "services", "up")
    assert "answers" in up.stdout and "starting" not in up.stdout.lower()
    cli(ctx, "services", "down")
    assert ctx.cache.client.ping()
    assert current(ctx.settings.database_url) is None  # the test's database is still there


def test_an_idle_worker_pool_stops_promptly_on_sigterm(ctx: WorkerContext) -> None:
    """SIGTERM to an idle `worker` pool ends it within seconds, every time."""
    from rq import Worker
    from rq.serializers import JSONSerializer

    migrate(ctx)  # the pool refuses to start on an unmigrated database
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent_sessions", "worker", "-n", "2"],
            env=settings_env(ctx),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for(
                lambda: (
                    [
                        w.get_state()
                        for w in Worker.all(connection=ctx.queue_redis, serializer=JSONSerializer)
                    ]
                    == ["idle", "idle"]
                ),
                "two workers idle in their loop",
                30,
            )
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            assert group_gone_within(proc, 5), "a process of the pool outlived its leader"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        wait_for(
            lambda: not Worker.all(connection=ctx.queue_redis, serializer=JSONSerializer),
            "the workers to deregister",
            30,
        )


def test_cleanup_retry_requeues_a_session_whose_cleanup_job_failed(ctx: WorkerContext) -> None:
    """A cleanup job that failed for good (its marker still fresh) no longer counts as under
    way: `cleanup retry` re-queues it; once a job waits, only `--force` queues another."""
    from rq.job import JobStatus
    from rq.registry import FailedJobRegistry

    migrate(ctx)
    (key,) = saved(ctx, 1)
    SessionLifecycle(ctx).workflow_ended(f.TENANT, "run-1", "aborted")
    cli(ctx, "flush", "--wait")
    (job_id,) = ctx.cleanup_queue.job_ids
    job = ctx.cleanup_queue.fetch_job(job_id)
    assert job is not None
    ctx.cleanup_queue.remove(job)  # it failed for good instead of running
    job.set_status(JobStatus.FAILED)
    FailedJobRegistry(queue=ctx.cleanup_queue).add(job, ttl=3600)
    assert "cleanup jobs queued: 1" in cli(ctx, "cleanup", "retry").stdout  # no longer alive
    assert "cleanup jobs queued: 0" in cli(ctx, "cleanup", "retry").stdout  # now it waits
    assert "cleanup jobs queued: 1" in cli(ctx, "cleanup", "retry", "--force").stdout
    cli(ctx, "worker", "-n", "1", "--burst")
    cli(ctx, "flush", "--wait")
    row = ctx.repo.get(key)
    assert row is not None and row.status is SessionStatus.CLEANED


def test_poison_list_show_retry_and_drop(ctx: WorkerContext) -> None:
    """A corrupt hash does not brick its node: the operator sees it, retries a fixed one
    and drops a hopeless one, after which the next entry reads Postgres's copy back."""
    migrate(ctx)
    good, corrupt = saved(ctx, 2)
    cli(ctx, "flush", "--wait")
    ctx.cache.save(good, f.session_write())  # v2 in Redis, v1 in Postgres
    ctx.cache.save(corrupt, f.session_write())
    corrupt_name, good_name = ctx.cache.keys.session(corrupt), ctx.cache.keys.session(good)
    ctx.cache.client.hset(corrupt_name, "snapshot", b"\xc1 not msgpack")
    shard = ctx.cache.keys.shard_of_key(good)
    assert ctx.cache.quarantine(shard, good_name, 2, "postgres refused: a fixed constraint")
    parking = cli(ctx, "flush", "--wait", "--json", check=False)  # parks the corrupt one
    assert parking.returncode == 1  # drained, but two sessions are parked, not in Postgres
    assert json.loads(parking.stdout.strip().splitlines()[-1])["parked"] == 2
    listed = json_out(ctx, "poison", "list")["parked"]
    assert isinstance(listed, dict) and set(listed) == {good_name, corrupt_name}
    assert "cannot decode" in listed[corrupt_name]["reason"]
    shown = json_out(ctx, "poison", "show", corrupt_name)
    assert "corrupt" in shown["redis"] and shown["postgres"]["version"] == 1  # type: ignore[index]
    assert json_out(ctx, "poison", "retry", good_name)["sessions"] == {good_name: True}
    retried = cli(ctx, "flush", "--wait", "--json", check=False)
    assert json.loads(retried.stdout.strip().splitlines()[-1])["parked"] == 1  # the corrupt one
    row = ctx.repo.get(good)
    assert row is not None and row.version == 2
    refused = cli(ctx, "poison", "drop", corrupt_name, check=False)  # no --yes, no terminal
    assert refused.returncode != 0 and ctx.cache.client.exists(corrupt_name)
    cli(ctx, "poison", "drop", corrupt_name, "--yes")
    assert not ctx.cache.client.exists(corrupt_name)
    assert "no parked sessions" in cli(ctx, "poison", "list").stdout
    entry = SessionLifecycle(ctx).enter(f.scope(node=corrupt.node_id))
    assert entry.resumable and entry.version == 1  # Postgres's copy, read back
    nope = cli(ctx, "poison", "retry", good_name, check=False)
    assert nope.returncode == 1 and "not parked" in nope.stderr
    garbage = cli(ctx, "poison", "show", "not-a-key", check=False)
    assert garbage.returncode == 2 and len(garbage.stderr.strip().splitlines()) == 1


def test_health_and_stats_tell_whether_a_pool_flushes(ctx: WorkerContext, tmp_path: Path) -> None:
    """`health` exits 0 only while a pool's trigger passes and the backlog is within the
    delivery bound (`--local`: this host's trigger, backlog not judged); `stats` shows the
    pool's workers and its trigger's last pass."""
    migrate(ctx)
    down = cli(ctx, "health", check=False)
    assert down.returncode == 1 and "no flush trigger has passed" in down.stdout
    with WorkerProcess(ctx.settings, 2, log=tmp_path / "pool.log"):
        wait_for(lambda: cli(ctx, "health", check=False).returncode == 0, "a healthy pool", 30)
        report = json_out(ctx, "health")
        assert report["healthy"] is True and report["problems"] == []
        assert report["delivery_bound_s"] == 0.3 + ctx.settings.flush_lock_ttl_s
        assert cli(ctx, "health", "--local", check=False).returncode == 0
        pool = json_out(ctx, "stats")["pool"]
        (trigger,) = pool["trigger_last_pass_age_s"]  # type: ignore[index]
        assert trigger.startswith(f"{socket.gethostname()}:")
        workers = pool["workers"]  # type: ignore[index]
        assert [w["name"].rsplit(":", 1)[1] for w in workers] == ["1", "2"]
        with ctx.repo.engine.connect() as conn:  # every flush now blocks in Postgres
            conn.execute(sa.text("LOCK TABLE agent_runtime_sessions IN ACCESS EXCLUSIVE MODE"))
            saved(ctx, 1)
            wait_for(
                lambda: "over the delivery bound" in cli(ctx, "health", check=False).stdout,
                "the backlog to pass the delivery bound",
                30,
            )
            assert cli(ctx, "health", "--local", check=False).returncode == 0
            conn.rollback()
    gone = cli(ctx, "health", check=False)
    assert gone.returncode == 1 and "no flush trigger has passed" in gone.stdout


def test_flush_without_a_worker_says_nothing_will_run_the_jobs(ctx: WorkerContext) -> None:
    migrate(ctx)
    saved(ctx, 2)
    result = cli(ctx, "flush")
    assert "no worker serves asc-flush: nothing runs these jobs" in result.stderr
