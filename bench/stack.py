"""Running the stack a benchmark needs: migrated databases, worker pools, bulk fills,
write counters and backlog diagnostics (split from :mod:`bench.harness`)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from agent_sessions.testing.worker_process import WorkerProcess
from bench.harness import HarnessError, fresh_database
from persistence.models import TABLE_NAME

if TYPE_CHECKING:
    from cache.records import SessionKey, SessionWrite
    from cache.settings import Settings
    from cache.store import RedisSessionCache
    from workers.context import WorkerContext


# --------------------------------------------------------------------------------- stacks
#
# The pieces the write-behind benchmarks share: a migrated scratch database, settings for a
# private stack, a real ``agent-sessions worker`` pool in its own process group, a pipelined
# bulk fill and a trigger that counts row writes. Product modules are imported lazily so the
# harness stays importable (and its unit tests fast) without the services.

POOL_READY_TIMEOUT_S = 60.0
_JOB_DONE = re.compile(r"Successfully completed (\S+?)\(.* job in (\d+):(\d+):([0-9.]+)s")


def wait_for(
    predicate: Callable[[], bool], what: str, *, timeout_s: float = 60.0, poll_s: float = 0.02
) -> float:
    """Poll ``predicate`` until it holds; seconds it took. :class:`HarnessError` on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise HarnessError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)
    return time.monotonic() - start


@contextmanager
def migrated_database(prefix: str = "asc_bench_") -> Iterator[str]:
    """:func:`fresh_database` with the project's schema applied (``persistence.migrate``)."""
    from persistence.migrate import upgrade

    with fresh_database(prefix) as url:
        upgrade(url)
        yield url


def bench_settings(redis_url: str, database_url: str, **overrides: Any) -> Settings:
    """Settings for a private stack; ``overrides`` are Settings fields (``flush_delay_ms=200``)."""
    from cache.settings import Settings

    return Settings(redis_url=redis_url, database_url=database_url, **overrides)


class WorkerPool(WorkerProcess):
    """The product's worker process group, plus what benchmarks ask of it."""

    def __init__(self, settings: Settings, processes: int) -> None:
        super().__init__(settings, processes)
        self.settings = settings
        self.processes = processes

    def registered(self) -> int:
        """How many RQ workers of this pool have registered (they then take jobs)."""
        from rq import Worker
        from rq.serializers import JSONSerializer

        from workers.queues import queue_connection

        if self.proc.poll() is not None:
            raise HarnessError(f"the worker pool exited ({self.proc.returncode}):\n{self.tail()}")
        with queue_connection(self.settings) as conn:
            return len(Worker.all(connection=conn, serializer=JSONSerializer))

    def wait_ready(self) -> float:
        """Block until every worker has registered; seconds it took."""
        return wait_for(
            lambda: self.registered() >= self.processes,
            f"{self.processes} RQ workers to register",
            timeout_s=POOL_READY_TIMEOUT_S,
            poll_s=0.1,
        )

    def job_seconds(self, function: str = "") -> list[float]:
        """Durations RQ logged for the completed jobs ("... job in 0:00:00.009444s") whose
        function name ends with ``function``: the time inside the job."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [
            int(h) * 3600 + int(m) * 60 + float(sec)
            for name, h, m, sec in _JOB_DONE.findall(text)
            if name.endswith(function)
        ]


@contextmanager
def worker_pool(settings: Settings, processes: int, *, ready: bool = True) -> Iterator[WorkerPool]:
    """A running worker pool for ``settings``, stopped (whole group) on exit."""
    pool = WorkerPool(settings, processes)
    try:
        if ready:
            pool.wait_ready()
        yield pool
    except BaseException:
        print(f"  worker pool log (tail):\n{pool.tail()}", flush=True)
        raise
    finally:
        pool.stop()


@contextmanager
def worker_context(settings: Settings) -> Iterator[WorkerContext]:
    """This process's store, repository and queues for ``settings``; closed on exit."""
    from workers.context import WorkerContext

    ctx = WorkerContext.from_settings(settings)
    try:
        yield ctx
    finally:
        ctx.close()


def bulk_save(
    cache: RedisSessionCache,
    keys: Sequence[SessionKey],
    writes: Sequence[SessionWrite],
    *,
    chunk: int = 1000,
) -> int:
    """Save ``keys[i]`` with ``writes[i % len(writes)]`` through the save script, pipelined.

    The same ``lua/save.lua`` call as ``RedisSessionCache.save`` (``save_call`` builds its
    KEYS and ARGV), ``chunk`` calls per round trip: a fast fill for benchmarks that need many
    live sessions. Returns how many saves the script accepted.
    """
    accepted = 0
    pipe = cache.client.pipeline(transaction=False)
    for i, key in enumerate(keys):
        names, args = cache.save_call(key, writes[i % len(writes)])
        cache.scripts.save(keys=names, args=args, client=pipe)
        if len(pipe) >= chunk or i == len(keys) - 1:
            accepted += sum(1 for reply in pipe.execute() if reply[0] == 0)
    return accepted


def install_write_counter(db_url: str, table: str = TABLE_NAME) -> None:
    """A trigger on ``table`` that counts every row INSERT and UPDATE (read it with
    :func:`counted_writes`); the independent cross-check of the store's own counters."""
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_row_writes (n bigint NOT NULL)")
        conn.execute("INSERT INTO bench_row_writes VALUES (0)")
        conn.execute(
            "CREATE FUNCTION bench_count_write() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN UPDATE bench_row_writes SET n = n + 1; RETURN NEW; END $$"
        )
        conn.execute(
            f"CREATE TRIGGER bench_count_writes AFTER INSERT OR UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION bench_count_write()"
        )


def counted_writes(db_url: str) -> int:
    import psycopg

    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT n FROM bench_row_writes").fetchone()
    return int(row[0]) if row else 0


def backlog_diagnostics(ctx: WorkerContext, *, entries: int = 3) -> dict[str, Any]:
    """Why dirty entries are not going away: per dirty shard its count, the flush lock's TTL
    and a few entries (versions, status); the flush queue's failed/scheduled/started jobs."""
    from rq import registry

    failed_registry: Any = registry.FailedJobRegistry
    scheduled: Any = registry.ScheduledJobRegistry
    started: Any = registry.StartedJobRegistry

    cache = ctx.cache
    shards: dict[str, Any] = {}
    for shard, count in dirty_shards(ctx)[:5]:
        found: list[tuple[bytes, float]] = cache.client.zrange(  # type: ignore[assignment]
            cache.keys.dirty(shard), 0, entries - 1, withscores=True
        )
        fields = ("version", "flushed_version", "status")
        shards[str(shard)] = {
            "dirty": count,
            "lock_pttl_ms": cache.client.pttl(cache.keys.flush_lock(shard)),
            "entries": [
                {
                    "since_ms": int(since),
                    **dict(zip(fields, _text(cache.client.hmget(name, fields)), strict=True)),
                    "postgres_version": _row_version(ctx, name.decode()),
                }
                for name, since in found
            ],
        }
    queue = ctx.flush_queue
    failed = failed_registry(queue=queue)
    return {
        "shards": shards,
        "queued": queue.count,
        "failed": [(j, _last_line(queue.fetch_job(j))) for j in failed.get_job_ids()[:3]],
        "scheduled": scheduled(queue=queue).get_job_ids()[:5],
        "started": started(queue=queue).get_job_ids()[:5],
    }


def dirty_shards(ctx: WorkerContext) -> list[tuple[int, int]]:
    from workers.drain import dirty_total

    return dirty_total(ctx)


def _row_version(ctx: WorkerContext, name: str) -> int | None:
    row = ctx.repo.get(ctx.cache.keys.parse_session(name))
    return None if row is None else row.version


def _text(values: Any) -> list[str | None]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def _last_line(job: Any) -> str:
    info = getattr(job, "exc_info", None) or ""
    lines = str(info).strip().splitlines()
    return lines[-1] if lines else ""
