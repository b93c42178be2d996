"""Delivery: every dirty session reaches Postgres within a bound, whatever RQ does (issue #9).

Each test reproduces a way the landed code stopped flushing a shard (or ran foreign code) and
proves the reconciling trigger, fresh job ids, in-job retries and the lock heartbeat keep
delivery bounded. Real redis-server, Postgres and ``agent-sessions worker`` processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from agent_backend.models import CreateRunRequest
from agent_sessions.audit import audit
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.outcomes import Entry, RunOutcome
from agent_sessions.testing.worker_process import WorkerProcess
from cache.errors import ConfigurationError, StoreOutOfMemory
from cache.records import SessionKey
from cache.server_checks import LISTPACK_ADVICE
from cache.settings import Settings
from cache.store import RedisSessionCache
from tests import factories as f
from tests.integration.support import make_ctx, node_composition, settings_env, wait_for
from tests.servers import Database, RedisServer
from workers.cleanup import CLEANUP_JOB
from workers.context import WorkerContext
from workers.drain import dirty_total, drain
from workers.flush_policy import pending_ttl_ms
from workers.queues import FLUSH_JOB, FlushRequest, request_flush
from workers.trigger import trigger_once

TABLE = "agent_runtime_sessions"


def nothing_dirty(ctx: WorkerContext) -> bool:
    return not dirty_total(ctx)


def in_postgres(ctx: WorkerContext, key: SessionKey, version: int) -> bool:
    row = ctx.repo.get(key)
    return row is not None and row.version >= version


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Callable[[WorkerContext, int], WorkerProcess]]:
    """Start ``agent-sessions worker -n N``; every pool is stopped after the test."""
    started: list[WorkerProcess] = []

    def start(ctx: WorkerContext, processes: int = 1) -> WorkerProcess:
        worker = WorkerProcess(ctx.settings, processes, log=tmp_path / f"pool-{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(graces_s=(5.0,))


def registered(ctx: WorkerContext, count: int) -> Callable[[], bool]:
    def check() -> bool:
        return len(Worker.all(queue=ctx.flush_queue)) >= count

    return check


# ------------------------------------------------------------------ 1. orphaned job ids


def test_an_orphaned_rq_job_id_never_stops_a_shard_from_flushing(
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    pool: Callable[[WorkerContext, int], WorkerProcess],
) -> None:
    """RQ's ``fetch_job`` race, driven step by step, leaves a queued job hash in no list and
    no registry. Delivery must not care: the shard is flushed anyway."""
    ctx = make_ctx(redis_url, migrated.url, shards=1, flush_delay_ms=300)
    queue = ctx.flush_queue
    for job_id in ("asc-flush-s000", "asc-flush-s000-urgent"):  # the ids the landed code used
        with pytest.raises(NoSuchJobError):  # 1. fetch_job misses: no job hash yet
            Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
        # 2. a concurrent caller's unique enqueue lands in between ...
        queue.enqueue("workers.jobs.flush_job", 0, False, job_id=job_id, unique=True)
        queue.remove(job_id)  # 3. ... and fetch_job's clean-up (LREM) takes it off the queue
        assert queue.connection.exists(f"rq:job:{job_id}") and job_id not in queue.job_ids
        assert queue.connection.ttl(f"rq:job:{job_id}") == -1  # an orphan, forever
    key = f.session_key()
    ctx.cache.save(key, f.session_write())
    pool(ctx, 1)
    wait_for(lambda: in_postgres(ctx, key, 1), "the orphaned shard to be flushed", 20)


def test_a_waiting_flush_job_holds_its_shard_however_long_workers_are_busy(
    redis_client: redis.Redis, redis_url: str, migrated: Database
) -> None:
    """Busy workers (every one in a long cleanup) must not make each trigger pass queue
    another job per due shard: the marker holds while its job waits, past the flush delay."""
    ctx = make_ctx(redis_url, migrated.url, shards=1, flush_delay_ms=300)
    ms = pending_ttl_ms(ctx.settings)
    assert request_flush(ctx.flush_queue, "asc", 0, pending_ms=ms) is FlushRequest.ENQUEUED
    time.sleep(1.2)  # four flush delays: the marker outlives them while its job waits
    for _ in range(3):
        assert request_flush(ctx.flush_queue, "asc", 0, pending_ms=ms) is FlushRequest.PENDING
    assert ctx.flush_queue.count == 1


def test_a_loops_due_shards_go_to_one_job_that_flushes_them_all(
    redis_client: redis.Redis, redis_url: str, migrated: Database
) -> None:
    """A few rows over many shards: one trigger pass queues one job naming every due shard
    (each shard's marker names it, so the next pass queues nothing), and the job flushes
    them all."""
    ctx = make_ctx(redis_url, migrated.url, shards=16, flush_delay_ms=0)
    keys = [f.session_key(run=f"run-{i}") for i in range(30)]
    for key in keys:
        ctx.cache.save(key, f.session_write())
    done = trigger_once(ctx)
    dirty_shards = {ctx.cache.keys.shard_of_key(key) for key in keys}
    assert set(done.enqueued) == set(done.due_shards) == dirty_shards and len(dirty_shards) > 5
    [job_id] = ctx.flush_queue.job_ids
    job = ctx.flush_queue.fetch_job(job_id)
    assert job is not None and sorted(job.args[0]) == sorted(dirty_shards)
    assert trigger_once(ctx).enqueued == ()  # every due shard's job still waits
    result, _ = _burst_worker(ctx)
    assert result.returncode == 0, result.stderr
    assert all(in_postgres(ctx, key, 1) for key in keys)
    assert dirty_total(ctx) == []


@pytest.mark.parametrize("fate", ["taken and killed before it started", "off every list"])
def test_a_marker_whose_job_no_longer_waits_is_taken_over_at_once(
    redis_client: redis.Redis, redis_url: str, migrated: Database, fate: str
) -> None:
    ctx = make_ctx(redis_url, migrated.url, shards=1, flush_delay_ms=300)
    queue, ms = ctx.flush_queue, pending_ttl_ms(ctx.settings)
    assert request_flush(queue, "asc", 0, pending_ms=ms) is FlushRequest.ENQUEUED
    [job_id] = queue.job_ids
    queue.connection.lrem(queue.key, 0, job_id)  # a worker took it, or RQ lost it
    if fate.startswith("taken"):
        queue.connection.hset(Job.key_for(job_id), "status", "started")
    assert request_flush(queue, "asc", 0, pending_ms=ms) is FlushRequest.ENQUEUED
    assert len(queue.job_ids) == 1 and queue.job_ids[0] != job_id


def test_concurrent_urgent_pauses_on_one_shard_all_land_and_none_is_misreported(
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    pool: Callable[[WorkerContext, int], WorkerProcess],
) -> None:
    """Three callers pausing on one shard for a while: no exception, every pause lands through
    the urgent path (the delay is an hour), and ``finish`` says what happened."""
    ctx = make_ctx(redis_url, migrated.url, shards=1, flush_delay_ms=3_600_000)
    worker = pool(ctx, 2)
    wait_for(registered(ctx, 2), "the workers to register")
    lc = SessionLifecycle(ctx)
    errors: list[BaseException] = []
    late: list[float] = []
    misreported: list[object] = []
    stop = time.monotonic() + 6.0

    def pauser(node: str) -> None:
        scope = f.scope(node=node)
        request = CreateRunRequest(composition=node_composition())
        try:
            while time.monotonic() < stop:
                entry = lc.enter(scope)
                outcome = RunOutcome(
                    "paused", "backend-run", request, f.snapshot(state={"t": time.monotonic()})
                )
                result = lc.finish(scope, entry, outcome)
                if result.metadata.get("session_flush") not in ("enqueued", "pending"):
                    misreported.append(result.metadata)
                assert result.version is not None and scope.key is not None
                started = time.monotonic()
                while not in_postgres(ctx, scope.key, result.version):
                    if time.monotonic() - started > 10:
                        late.append(time.monotonic() - started)
                        return
                    time.sleep(0.01)
                late.append(time.monotonic() - started)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pauser, args=(f"node-{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert not misreported, misreported[:3]
    assert late and max(late) < 10, f"slowest pause took {max(late):.1f}s\n{worker.tail()}"


# ------------------------------------------------------------------ 2. SIGKILL mid-flush


def _slow_statements(db_url: str, seconds: float) -> None:
    """Every statement on the table sleeps: flushes last long enough to be killed midway."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION slow_flush() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$"
        )
        conn.execute(
            f"CREATE TRIGGER slow_flush BEFORE INSERT OR UPDATE ON {TABLE} "
            "FOR EACH STATEMENT EXECUTE FUNCTION slow_flush()"
        )


def _kill_a_flushing_worker(ctx: WorkerContext, timeout: float = 20.0) -> int:
    """SIGKILL a worker while it runs a flush job; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in Worker.all(queue=ctx.flush_queue):
            job_id = worker.get_current_job_id()
            if job_id and "flush" in job_id and worker.pid:
                try:
                    os.kill(worker.pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                return worker.pid
        time.sleep(0.01)
    pytest.fail("no worker was seen flushing")


def test_sigkill_mid_flush_ten_times_then_everything_lands_within_three_flush_delays(
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    pool: Callable[[WorkerContext, int], WorkerProcess],
) -> None:
    """Killing the flushing worker ten times under steady saves never holds a shard: after the
    last kill every session is in Postgres within 3 x flush_delay."""
    delay_s = 2.0
    ctx = make_ctx(
        redis_url, migrated.url, shards=2, flush_delay_ms=int(delay_s * 1000), flush_lock_ttl_s=1
    )
    _slow_statements(migrated.url, 0.3)
    keys = [f.session_key(run=f"run-{i}") for i in range(40)]
    worker = pool(ctx, 2)
    wait_for(registered(ctx, 2), "the workers to register")
    stop = threading.Event()

    def saver() -> None:
        i = 0
        while not stop.is_set():
            ctx.cache.save(keys[i % len(keys)], f.session_write(f.snapshot(state={"i": i})))
            i += 1
            time.sleep(0.005)

    thread = threading.Thread(target=saver)
    thread.start()
    try:
        for _ in range(10):
            _kill_a_flushing_worker(ctx)
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    killed_at = time.monotonic()
    versions = {key: ctx.cache.load(key).version for key in keys}
    wait_for(
        lambda: all(in_postgres(ctx, k, v) for k, v in versions.items()),
        f"every session in Postgres within 3 x flush_delay after the last kill\n{worker.tail()}",
        3 * delay_s,
    )
    assert time.monotonic() - killed_at <= 3 * delay_s
    wait_for(lambda: audit(ctx).faults == 0, "Redis and Postgres to agree", 10)


# ------------------------------------------------------------------ 3. transient row errors


def test_a_serialization_failure_on_one_row_does_not_hold_the_rest_of_its_shard(
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    pool: Callable[[WorkerContext, int], WorkerProcess],
) -> None:
    """SQLSTATE 40001 on one tenant's row: the other sessions of its shard still land within one
    flush delay of being due; the refused one stays dirty (not poisoned) and lands later."""
    with psycopg.connect(migrated.url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.tenant_id = 'tenant-bad' THEN RAISE EXCEPTION 'could not serialize access' "
            "USING ERRCODE = '40001'; END IF; RETURN NEW; END $$"
        )
        conn.execute(
            f"CREATE TRIGGER refuse_bad BEFORE INSERT OR UPDATE ON {TABLE} "
            "FOR EACH ROW EXECUTE FUNCTION refuse_bad()"
        )
    delay_s = 1.0
    ctx = make_ctx(redis_url, migrated.url, shards=1, flush_delay_ms=int(delay_s * 1000))
    bad = f.session_key(tenant="tenant-bad")
    ctx.cache.save(bad, f.session_write())
    pool(ctx, 1)
    wait_for(registered(ctx, 1), "the worker to register")
    time.sleep(delay_s * 2)  # the bad row is now failing batch after batch
    good = [f.session_key(tenant="tenant-good", run=f"run-{i}") for i in range(5)]
    for key in good:
        ctx.cache.save(key, f.session_write())
    saved = time.monotonic()
    wait_for(lambda: all(in_postgres(ctx, k, 1) for k in good), "good rows", 2 * delay_s + 1)
    assert time.monotonic() - saved <= 2 * delay_s + 1
    shard = ctx.cache.keys.shard_of_key(bad)
    assert ctx.repo.get(bad) is None
    assert ctx.cache.poison(shard) == {}
    assert dirty_total(ctx) == [(0, 1)]
    with psycopg.connect(migrated.url, autocommit=True) as conn:
        conn.execute(f"DROP TRIGGER refuse_bad ON {TABLE}")
    wait_for(lambda: in_postgres(ctx, bad, 1), "the once-refused row after the fault ended", 10)


# ------------------------------------------------------------------ 4. OOM and eviction policy


@pytest.fixture
def small_redis() -> Iterator[RedisServer]:
    with RedisServer(["--maxmemory", "8mb", "--maxmemory-policy", "noeviction"]) as server:
        yield server


def _fill_until_oom(client: redis.Redis) -> int:
    for i in range(10_000):
        try:
            client.set(f"junk:{i}", b"x" * 50_000)
        except redis.exceptions.OutOfMemoryError:
            return i
    pytest.fail("Redis never reached maxmemory")


def test_over_maxmemory_saves_are_refused_typed_with_nothing_written_and_the_backlog_drains(
    small_redis: RedisServer, migrated: Database
) -> None:
    ctx = make_ctx(small_redis.url, migrated.url, shards=2)
    keys = [f.session_key(run=f"run-{i}") for i in range(20)]
    for key in keys:
        ctx.cache.save(key, f.session_write(pending_form_id="form-1"))
    with small_redis.client() as client:
        _fill_until_oom(client)
        again, fresh = keys[0], f.session_key(run="run-new")
        with pytest.raises(StoreOutOfMemory):  # an existing session: its first write is HDEL
            ctx.cache.save(again, f.session_write(f.snapshot_of_size(200_000)))
        with pytest.raises(StoreOutOfMemory):
            ctx.cache.save(fresh, f.session_write())
        assert ctx.cache.load(again).version == 1
        assert ctx.cache.load(fresh).record is None
        assert client.hstrlen(ctx.cache.keys.session(again), "snapshot") < 1000
        assert not client.exists(ctx.cache.keys.session(fresh))
        report = drain(ctx, timeout_s=30)  # the lock, the reads and the acks all work
        assert report.drained and report.written == len(keys)
        for key in keys:
            assert in_postgres(ctx, key, 1)
        client.delete(*[f"junk:{i}" for i in range(10_000)])
    assert ctx.cache.save(fresh, f.session_write()) == 1


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random"])
def test_an_allkeys_eviction_policy_is_refused_at_start(policy: str) -> None:
    with RedisServer(["--maxmemory", "64mb", "--maxmemory-policy", policy]) as server:
        client = server.client()
        with pytest.raises(ConfigurationError, match=policy):
            RedisSessionCache(client, Settings(redis_url=server.url))
        client.close()


def test_a_volatile_eviction_policy_starts_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with RedisServer(["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"]) as server:
        client = server.client()
        RedisSessionCache(client, Settings(redis_url=server.url))
        client.close()
    assert any("volatile-lru" in record.getMessage() for record in caplog.records)


def _listpack_advice(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "hash-max-listpack-value" in r.getMessage()]


def test_the_default_hash_encoding_limit_is_pointed_out_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="cache.server_checks")
    with RedisServer() as server:  # Redis' default: hash-max-listpack-value 64
        client = server.client()
        RedisSessionCache(client, Settings(redis_url=f"{server.url}&password=hunter2"))
        (advice,) = _listpack_advice(caplog)
        assert "hash-max-listpack-value 64" in advice and str(LISTPACK_ADVICE) in advice
        assert "hunter2" not in advice and "password=***" in advice
        client.config_set("hash-max-listpack-value", LISTPACK_ADVICE)
        caplog.clear()
        RedisSessionCache(client, Settings(redis_url=server.url))
        assert _listpack_advice(caplog) == []
        client.close()


def test_a_redis_that_refuses_config_is_trusted_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="cache.server_checks")
    with RedisServer() as server:
        admin = server.client()
        admin.acl_setuser(
            "app",
            enabled=True,
            passwords=["+pw"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", "-config"],
        )
        client = server.client(username="app", password="pw")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.config_get("maxmemory-policy")
        cache = RedisSessionCache(client, Settings(redis_url=server.url))
        assert cache.save(f.session_key(), f.session_write()) == 1
        messages = [r.getMessage() for r in caplog.records]
        assert any("cannot read maxmemory-policy" in m for m in messages)
        assert any("cannot read hash-max-listpack-value" in m for m in messages)
        client.close()
        admin.close()


# ------------------------------------------------------------------ 5. foreign jobs


def test_a_worker_refuses_a_job_that_is_not_one_of_ours(
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    pool: Callable[[WorkerContext, int], WorkerProcess],
    tmp_path: Path,
) -> None:
    """Redis write access must not be code execution: a JSON job naming ``os.system`` pushed on
    the flush queue is dropped unrun, and the worker goes on flushing."""
    ctx = make_ctx(redis_url, migrated.url, shards=1, flush_delay_ms=200)
    marker = tmp_path / "pwned"
    foreign = Queue(ctx.flush_queue.name, connection=ctx.queue_redis, serializer=JSONSerializer)
    job = foreign.enqueue("os.system", f"touch {marker}")
    pool(ctx, 1)
    key = f.session_key()
    ctx.cache.save(key, f.session_write())
    wait_for(lambda: in_postgres(ctx, key, 1), "a flush after the foreign job", 20)
    wait_for(lambda: job.id not in foreign.job_ids, "the foreign job to leave the queue", 20)
    assert not marker.exists()
    assert ctx.cache.counters().get("foreign_jobs_refused") == 1


def _burst_worker(ctx: WorkerContext) -> tuple[subprocess.CompletedProcess[str], int]:
    """``agent-sessions worker -n 1 --burst`` and the peak RSS (bytes) of its processes."""
    probe = (
        "import resource, subprocess, sys; "
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stderr.write(done.stderr); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(done.returncode)"
    )
    worker = [sys.executable, "-m", "agent_sessions", "worker", "-n", "1", "--burst"]
    result = subprocess.run(
        [sys.executable, "-c", probe, *worker],
        env=settings_env(ctx),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, int(result.stdout.strip().splitlines()[-1]) * 1024


def _inflating_payload(inflated_bytes: int) -> bytes:
    """A zlib stream of a flush job's JSON whose argument inflates to ``inflated_bytes``,
    compressed in chunks (this process never holds it inflated)."""
    deflater = zlib.compressobj(9)
    parts = [deflater.compress(b'["workers.jobs.flush_job", null, [1, "')]
    chunk = b"A" * (1 << 20)
    parts += [deflater.compress(chunk) for _ in range(inflated_bytes // len(chunk))]
    parts += [deflater.compress(b'"], {}]'), deflater.flush()]
    return b"".join(parts)


@pytest.mark.parametrize(
    ("inflated_mib", "says"),
    [(400, "its stored payload is"), (16, "its payload inflates to more than 65536 bytes")],
)
def test_a_job_that_inflates_to_megabytes_is_refused_before_it_inflates(
    redis_client: redis.Redis, redis_url: str, migrated: Database, inflated_mib: int, says: str
) -> None:
    """Before, RQ inflated a 389 KB zlib stream to ~400 MB when it fetched the job (the
    worker reached 1.23 GB) before our code saw the job. Now the worker refuses a payload
    over 64 KiB, stored or inflated, and its processes stay small."""
    ctx = make_ctx(redis_url, migrated.url, shards=4)
    job = ctx.flush_queue.enqueue(FLUSH_JOB, 1)
    bomb = _inflating_payload(inflated_mib << 20)
    ctx.queue_redis.hset(Job.key_for(job.id), "data", bomb)
    result, peak = _burst_worker(ctx)
    assert result.returncode == 0, result.stderr
    assert says in result.stderr
    assert ctx.cache.counters().get("jobs_refused_oversized") == 1
    assert job.id not in ctx.flush_queue.job_ids
    assert len(bomb) < 1 << 20 and peak < 300 << 20, f"peak RSS {peak >> 20} MiB"


@pytest.mark.parametrize("shard", [10**30, -1, 9999, "1", True])
def test_a_flush_job_with_an_impossible_shard_is_refused_and_counted(
    redis_client: redis.Redis, redis_url: str, migrated: Database, shard: object
) -> None:
    """Before, ``flush_job(10**30)``, ``(-1)`` and ``(9999)`` finished silently."""
    ctx = make_ctx(redis_url, migrated.url, shards=4)
    ctx.flush_queue.enqueue(FLUSH_JOB, shard)
    result, _ = _burst_worker(ctx)
    assert result.returncode == 0, result.stderr
    assert f"shard {shard!r} is not one of 0..3" in result.stderr
    assert ctx.cache.counters().get("jobs_refused_bad_arguments") == 1


@pytest.mark.parametrize(
    ("shards", "says"),
    [([], "not a non-empty list"), ([1, 1], "not a non-empty list"), ([0, 9], "shard 9 is")],
)
def test_a_flush_job_with_an_impossible_list_of_shards_is_refused_and_counted(
    redis_client: redis.Redis, redis_url: str, migrated: Database, shards: object, says: str
) -> None:
    ctx = make_ctx(redis_url, migrated.url, shards=4)
    ctx.flush_queue.enqueue(FLUSH_JOB, shards)
    result, _ = _burst_worker(ctx)
    assert result.returncode == 0, result.stderr
    assert says in result.stderr
    assert ctx.cache.counters().get("jobs_refused_bad_arguments") == 1


def test_a_cleanup_job_with_arguments_no_session_has_is_refused(
    redis_client: redis.Redis, redis_url: str, migrated: Database
) -> None:
    ctx = make_ctx(redis_url, migrated.url, shards=4)
    ctx.cleanup_queue.enqueue(CLEANUP_JOB, "t", "r", "n", "b", "x" * 300)
    ctx.cleanup_queue.enqueue(CLEANUP_JOB, "t", "r", "n", "b", "a", "alien-owner")
    result, _ = _burst_worker(ctx)
    assert result.returncode == 0, result.stderr
    assert "not a session key" in result.stderr and "owner type 'alien-owner'" in result.stderr
    assert ctx.cache.counters().get("jobs_refused_bad_arguments") == 2


# ------------------------------------------------------------------ 6. durable pause


def test_a_durable_pause_survives_a_redis_crash_right_after_finish(
    migrated: Database,
) -> None:
    """``finish(..., durable=True)`` writes the pause to Postgres before it returns: a Redis
    SIGKILL right after (no persistence) cannot lose it."""
    with RedisServer() as server:
        ctx = make_ctx(server.url, migrated.url, flush_delay_ms=3_600_000)
        lc = SessionLifecycle(ctx)
        scope = f.scope()
        request = CreateRunRequest(composition=node_composition())
        paused = f.snapshot(state={"pending": "approval"})
        result = lc.finish(
            scope, Entry(version=0), RunOutcome("paused", "run-p", request, paused), durable=True
        )
        assert result.status == "paused"
        assert result.metadata["session_flush"] == "durable"
        server.kill()
        server.start()
        entry = SessionLifecycle(make_ctx(server.url, migrated.url)).enter(scope)
        assert entry.resumable and entry.snapshot == paused


def test_a_pause_whose_flush_cannot_be_queued_says_so(
    redis_client: redis.Redis, redis_url: str, migrated: Database, tmp_path: Path
) -> None:
    """When the queue's Redis is unreachable the pause is still saved, and ``finish`` reports
    that no flush job was queued instead of claiming one was."""
    ctx = make_ctx(
        redis_url, migrated.url, rq_redis_url=f"unix://{tmp_path}/nobody.sock", socket_timeout_s=1
    )
    lc = SessionLifecycle(ctx)
    request = CreateRunRequest(composition=node_composition())
    outcome = RunOutcome("paused", "r", request, f.snapshot())
    result = lc.finish(f.scope(), Entry(version=0), outcome)
    assert result.metadata["session_snapshot_persisted"] is True
    assert result.metadata["session_flush"] == "failed"
    assert result.metadata["session_flush_enqueued"] is False
