"""What an operator sees of a pool that starts and stops: its log lines (ISO-8601 times, text
or JSON, the start-up advice once), its RQ workers' names, both queues in ``rq info``, and
no metrics directory left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from agent_sessions.testing.worker_process import WorkerProcess
from cache.records import SessionKey
from tests import factories as f
from tests.integration.support import group_gone_within, make_ctx, settings_env, wait_for
from tests.servers import Database, RedisServer, free_port
from workers.context import WorkerContext

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 [\w.]+ [A-Z]+: ")
ADVICE = "hash-max-listpack-value 64"
EVICTION = "maxmemory-policy volatile-lru"


@pytest.fixture
def volatile_redis() -> Iterator[RedisServer]:
    """A private Redis whose settings get both start-up lines: the eviction-policy warning
    and (Redis' default listpack limit) the memory advice."""
    with RedisServer(["--maxmemory-policy", "volatile-lru"]) as server:
        yield server


@pytest.fixture
def ctx(volatile_redis: RedisServer, migrated: Database) -> WorkerContext:
    return make_ctx(volatile_redis.url, migrated.url)


@pytest.fixture
def pools(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start pools (own process group, a log file in the test's directory); all are killed
    at the end of the test."""
    started: list[WorkerProcess] = []

    def start(ctx: WorkerContext, processes: int = 2, **kwargs: object) -> WorkerProcess:
        log = tmp_path / f"pool-{len(started)}.log"
        pool = WorkerProcess(ctx.settings, processes, log=log, **kwargs)  # type: ignore[arg-type]
        started.append(pool)
        return pool

    yield start
    for pool in started:
        pool.kill()


def flushed_by_pool(ctx: WorkerContext, n: int = 4) -> None:
    """Save ``n`` sessions and wait for the pool to write them (its workers build their
    store when they take their first job)."""
    keys: list[SessionKey] = [f.session_key(node=f"node-{i}") for i in range(n)]
    for key in keys:
        ctx.cache.save(key, f.session_write())
    wait_for(lambda: all(ctx.repo.get(key) for key in keys), "the pool to flush", 30)


def idle_workers(ctx: WorkerContext, count: int) -> list[Worker]:
    found: list[Worker] = []

    def idle() -> bool:
        found[:] = Worker.all(queue=ctx.flush_queue, serializer=JSONSerializer)
        return len(found) == count and all(w.get_state() == "idle" for w in found)

    wait_for(idle, f"{count} idle RQ workers", 30)
    return found


def stopped(pool: WorkerProcess) -> list[str]:
    """SIGTERM the pool's group; its log's lines once every process is gone."""
    os.killpg(pool.proc.pid, signal.SIGTERM)
    assert group_gone_within(pool.proc, 10), pool.tail(40)
    return [line for line in pool.log.read_text().splitlines() if line.strip()]


def test_a_pool_logs_iso_times_and_says_its_start_up_advice_once(
    ctx: WorkerContext, pools: Callable[..., WorkerProcess]
) -> None:
    """Before, ``HH:MM:SS`` times, and the advice once per process that built a store
    (the parent, the trigger, each worker: 4 times with two workers)."""
    pool = pools(ctx)
    idle_workers(ctx, 2)
    flushed_by_pool(ctx)
    lines = stopped(pool)
    assert [line for line in lines if not TEXT_LINE.match(line)] == []
    assert len([line for line in lines if ADVICE in line]) == 1, lines
    assert len([line for line in lines if EVICTION in line]) == 1, lines
    assert any(" rq.worker INFO: " in line for line in lines), "RQ's lines use the same shape"


def test_a_pool_names_its_workers_host_pid_slot_and_lists_both_queues_from_the_start(
    ctx: WorkerContext, pools: Callable[..., WorkerProcess]
) -> None:
    """Before, ``rq info`` listed a queue only after its first job (the cleanup queue after
    the first workflow end)."""
    pools(ctx)
    workers = idle_workers(ctx, 2)
    names = sorted(w.name for w in workers)
    assert names == sorted(f"{socket.gethostname()}:{w.pid}:{slot}" for w, slot in _slots(workers))
    listed = {q.name for q in Queue.all(connection=ctx.queue_redis, serializer=JSONSerializer)}
    assert listed == {"asc-flush", "asc-cleanup"}
    info = subprocess.run(
        [str(Path(sys.executable).parent / "rq"), "info", "-u", ctx.settings.queue_redis_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "asc-flush" in info and "asc-cleanup" in info, info
    assert all(name in info for name in names), info


def _slots(workers: list[Worker]) -> list[tuple[Worker, str]]:
    return [(w, w.name.rsplit(":", 1)[1]) for w in workers]


def test_json_logs_are_one_object_per_line_for_the_pool_and_the_cli(
    ctx: WorkerContext, pools: Callable[..., WorkerProcess]
) -> None:
    pool = pools(ctx, env={"ASC_LOG_FORMAT": "json"})
    idle_workers(ctx, 2)
    flushed_by_pool(ctx)
    entries = [json.loads(line) for line in stopped(pool)]
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    assert all(datetime.fromisoformat(entry["time"]).tzinfo is not None for entry in entries)
    loggers = {entry["logger"] for entry in entries}
    assert {"cache.server_checks", "rq.worker", "workers.supervisor"} <= loggers, loggers
    assert len([e for e in entries if ADVICE in e["message"]]) == 1
    stats = subprocess.run(
        [sys.executable, "-m", "agent_sessions", "stats", "--json"],
        env=settings_env(ctx) | {"ASC_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (warning,) = [json.loads(line) for line in stats.stderr.splitlines()]  # warnings only
    assert warning["level"] == "WARNING" and EVICTION in warning["message"]


def test_a_bad_log_format_stops_the_pool_with_one_line(ctx: WorkerContext) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent_sessions", "worker", "-n", "1", "--burst"],
        env=settings_env(ctx) | {"ASC_LOG_FORMAT": "xml"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: ConfigurationError: ASC_LOG_FORMAT: must be text or json, got 'xml'"
    ]


def metrics_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("asc-metrics-*"))


def test_a_metrics_pool_removes_its_metrics_directory_and_a_killed_ones_at_the_next_start(
    ctx: WorkerContext,
    pools: Callable[..., WorkerProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, every ``--metrics-port`` run left an ``asc-metrics-*`` directory in /tmp."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)  # the pool makes its own
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}

    def metrics_pool() -> tuple[WorkerProcess, Path]:
        port = free_port()
        pool = pools(ctx, 1, args=("--metrics-port", str(port)), env=env)
        wait_for(lambda: _answers(port), "the metrics endpoint", 30)
        (own,) = _own(tmp, pool)
        return pool, own

    killed, left = metrics_pool()
    killed.kill()  # SIGKILL to the group: nothing gets to remove anything
    assert metrics_dirs(tmp) == [left]
    pool, own = metrics_pool()
    assert metrics_dirs(tmp) == [own], "the killed pool's directory is still there"
    stopped(pool)
    assert metrics_dirs(tmp) == []


def _own(tmp: Path, pool: WorkerProcess) -> list[Path]:
    return [
        path for path in metrics_dirs(tmp) if path.name.startswith(f"asc-metrics-{pool.proc.pid}-")
    ]


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
            return True
    except OSError:
        return False
