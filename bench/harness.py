"""Shared benchmark machinery: the result shape, statistics, timing, servers, machine facts.

Every benchmark returns one :class:`Result`. Its JSON form has exactly seven mandatory keys
(:data:`RESULT_KEYS`) plus ``extra`` for details; ``extra["met"]`` says whether the goal was
met and ``extra["spread"]`` is the one-line spread shown in ``docs/benchmarks.md``.

Timing compares like with like: :func:`run_interleaved` alternates the arms of a benchmark in
blocks, so CPU-frequency and idle-state drift on a small VM hits every arm equally. Absolute
microseconds on this machine move about 4x with the CPU's idle state; ratios barely move.
"""

from __future__ import annotations

import importlib
import math
import operator
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from cache.records import SessionKey, SessionWrite
    from cache.settings import Settings
    from cache.store import RedisSessionCache
    from workers.context import WorkerContext

RESULT_KEYS = ("name", "metric", "value", "baseline", "ratio", "goal", "unit")
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/agent_sessions"

_GOAL = re.compile(r"^\s*(<=|>=|<|>)\s*([0-9]+(?:\.[0-9]+)?)\s*$")
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}


class HarnessError(RuntimeError):
    """A benchmark could not run (bad goal, missing server binary, unknown module…)."""


# --------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    """One benchmark outcome. ``ratio`` is ``value / baseline`` from the same run."""

    name: str
    metric: str
    value: float
    baseline: float | None
    ratio: float | None
    goal: str
    unit: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        met = self.extra.get("met")
        return met if isinstance(met, bool) else None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {key: getattr(self, key) for key in RESULT_KEYS}
        data["extra"] = self.extra
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Result:
        missing = [key for key in RESULT_KEYS if key not in data]
        if missing:
            raise HarnessError(f"result is missing keys {missing}")
        return cls(**{key: data[key] for key in RESULT_KEYS}, extra=dict(data.get("extra", {})))

    def with_extra(self, **values: Any) -> Result:
        return Result(
            **{key: getattr(self, key) for key in RESULT_KEYS}, extra={**self.extra, **values}
        )


def parse_goal(goal: str) -> tuple[str, float]:
    """``"<= 1.3"`` → ``("<=", 1.3)``."""
    match = _GOAL.match(goal)
    if match is None:
        raise HarnessError(f"goal must look like '<= 1.3' or '>= 5000', got {goal!r}")
    return match.group(1), float(match.group(2))


def goal_met(goal: str, observed: float | None) -> bool:
    if observed is None:
        return False
    op, threshold = parse_goal(goal)
    return _COMPARE[op](observed, threshold)


def make_result(
    name: str,
    metric: str,
    *,
    value: float,
    baseline: float | None,
    goal: str,
    unit: str,
    goal_on: str = "ratio",
    extra: Mapping[str, Any] | None = None,
) -> Result:
    """A result with ``ratio`` and ``extra["met"]`` computed; the goal applies to ``goal_on``."""
    if goal_on not in ("ratio", "value"):
        raise HarnessError(f"goal_on must be 'ratio' or 'value', got {goal_on!r}")
    rat = round(ratio(value, baseline), 3) if baseline is not None else None
    observed = rat if goal_on == "ratio" else value
    details = {"met": goal_met(goal, observed), "goal_on": goal_on, **(extra or {})}
    return Result(name, metric, value, baseline, rat, goal, unit, details)


# --------------------------------------------------------------------------------- statistics


def median(samples: Sequence[float]) -> float:
    if not samples:
        raise HarnessError("median of no samples")
    return float(statistics.median(samples))


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least ``q`` % of samples <= it."""
    if not samples:
        raise HarnessError("percentile of no samples")
    if not 0 < q <= 100:
        raise HarnessError(f"percentile must be in (0, 100], got {q}")
    ordered = sorted(samples)
    return float(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)])


def ratio(value: float, baseline: float) -> float:
    if baseline <= 0:
        raise HarnessError(f"baseline must be positive, got {baseline}")
    return value / baseline


@dataclass(frozen=True)
class Summary:
    """Median, p99 and count of samples, in the samples' unit."""

    median: float
    p99: float
    count: int


def summarize(samples: Sequence[float]) -> Summary:
    return Summary(median(samples), percentile(samples, 99), len(samples))


def ns_to_us(samples: Sequence[int]) -> list[float]:
    return [sample / 1000 for sample in samples]


# --------------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], object], count: int) -> list[int]:
    """Wall time of ``count`` sequential calls of ``fn``, in nanoseconds each."""
    clock = time.perf_counter_ns
    samples = [0] * count
    for i in range(count):
        start = clock()
        fn()
        samples[i] = clock() - start
    return samples


BlockHook = Callable[[int, Mapping[str, list[int]]], None]


def run_interleaved(
    arms: Mapping[str, Callable[[], object]],
    *,
    blocks: int,
    per_block: int,
    warmup: int = 0,
    on_block: BlockHook | None = None,
) -> dict[str, list[list[int]]]:
    """Time every arm in ``blocks`` alternating blocks; ``{arm: [block samples (ns)]}``.

    Block order alternates (A B, B A, A B, …) so neither arm always runs second. ``warmup``
    calls of each arm run first and are discarded. ``on_block(i, {arm: samples})`` reports
    progress after each block.
    """
    names = list(arms)
    for name in names:
        time_calls(arms[name], warmup)
    out: dict[str, list[list[int]]] = {name: [] for name in names}
    for index in range(blocks):
        order = names if index % 2 == 0 else names[::-1]
        block = {name: time_calls(arms[name], per_block) for name in order}
        for name in names:
            out[name].append(block[name])
        if on_block is not None:
            on_block(index, block)
    return out


# --------------------------------------------------------------------------------- registry

RunFn = Callable[[bool], Result]


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: the module holding ``run(quick: bool) -> Result``."""

    module: str
    description: str

    def load(self) -> RunFn:
        run = getattr(importlib.import_module(self.module), "run", None)
        if not callable(run):
            raise HarnessError(f"{self.module} has no run(quick: bool) -> Result")
        return cast(RunFn, run)


# --------------------------------------------------------------------------------- servers


@contextmanager
def private_redis() -> Iterator[str]:
    """A private ``redis-server`` (unix socket, no persistence) for one run; yields its URL."""
    from tests.servers import RedisServer  # the project's test servers; no pytest needed

    with RedisServer() as server:
        yield server.url


def database_url() -> str:
    return os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


@contextmanager
def fresh_database(prefix: str = "asc_bench_") -> Iterator[str]:
    """A new database on ``$DATABASE_URL``'s server, dropped on exit; yields its psycopg URL."""
    from tests.servers import fresh_database as _fresh

    with _fresh(database_url(), prefix=prefix) as database:
        yield database.url


# --------------------------------------------------------------------------------- machine


def _first_line_with(path: str, prefix: str) -> str | None:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(prefix)), None)


def _command_output(argv: Sequence[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    return done.stdout.strip() or None


def redis_server_version() -> str:
    out = _command_output(["redis-server", "--version"]) or ""
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else "not found"


def postgres_version(url: str | None = None) -> str:
    """The version of ``$DATABASE_URL``'s server, or why it could not be read."""
    import psycopg

    from tests.servers import with_database

    try:
        server = with_database(url or database_url(), "postgres")
        with psycopg.connect(server, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error as exc:
        return f"not reachable ({type(exc).__name__})"
    return str(row[0]) if row else "unknown"


def _memory() -> str:
    total = _first_line_with("/proc/meminfo", "MemTotal")
    return f"{int(total.split()[0]) / 1024 / 1024:.1f} GiB" if total else "unknown"


def machine_facts(*, with_postgres: bool = True) -> dict[str, str]:
    """What a reader needs to judge the numbers: CPU, memory, OS, interpreter, servers."""
    import hiredis
    import redis

    facts = {
        "nproc": str(os.cpu_count() or 0),
        "cpu": _first_line_with("/proc/cpuinfo", "model name") or platform.processor(),
        "memory": _memory(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "redis_server": redis_server_version(),
        "redis_py": f"{redis.__version__} (hiredis {hiredis.__version__})",
    }
    if with_postgres:
        facts["postgres"] = postgres_version()
        facts["postgres_settings"] = postgres_settings()
    facts["loadavg_1m_now"] = f"{os.getloadavg()[0]:.2f}"
    return facts


def postgres_settings(url: str | None = None) -> str:
    """The durability settings of ``$DATABASE_URL``'s server (what a commit costs)."""
    import psycopg

    from tests.servers import with_database

    names = ("fsync", "synchronous_commit", "wal_sync_method", "shared_buffers")
    try:
        server = with_database(url or database_url(), "postgres")
        with psycopg.connect(server, connect_timeout=3) as conn:
            values = [conn.execute(f"SHOW {name}").fetchone() for name in names]
    except psycopg.Error as exc:
        return f"not reachable ({type(exc).__name__})"
    shown = ", ".join(f"{n}={v[0] if v else '?'}" for n, v in zip(names, values, strict=True))
    return f"{shown} (the shared server of $DATABASE_URL; a fresh database per benchmark)"


# --------------------------------------------------------------------------------- stacks
#
# The pieces the write-behind benchmarks share: a migrated scratch database, settings for a
# private stack, a real ``agent-sessions worker`` pool in its own process group, a pipelined
# bulk fill and a trigger that counts row writes. Product modules are imported lazily so the
# harness stays importable (and its unit tests fast) without the services.

_SERVICE_ENV = ("REDIS_URL", "RQ_REDIS_URL", "DATABASE_URL", "AGENT_BACKEND_URL")
POOL_READY_TIMEOUT_S = 60.0
POOL_STOP_GRACE_S = (3.0, 10.0)
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


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process exactly ``settings``.

    Every field that was set explicitly is passed as ``ASC_<FIELD>`` (which wins over the
    plain service names); the rest keep the child's own defaults. Inherited ``ASC_*`` and
    service variables are dropped so nothing of the caller's environment leaks in.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("ASC_") and name not in _SERVICE_ENV
    }
    for name in sorted(settings.model_fields_set):
        value = getattr(settings, name)
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[f"ASC_{name.upper()}"] = text
    return env


class WorkerPool:
    """``python -m agent_sessions worker -n N`` (RQ pool + flush trigger) in its own group."""

    def __init__(self, settings: Settings, processes: int) -> None:
        self.settings = settings
        self.processes = processes
        fd, path = tempfile.mkstemp(prefix="asc-bench-workers-", suffix=".log")
        self.log = Path(path)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent_sessions", "worker", "-n", str(processes)],
                env=settings_env(settings),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

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
        function name ends with ``function``: the time inside the job horse."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [
            int(h) * 3600 + int(m) * 60 + float(sec)
            for name, h, m, sec in _JOB_DONE.findall(text)
            if name.endswith(function)
        ]

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the group (twice: RQ's warm, then cold shutdown), SIGKILL what is left."""
        try:
            for grace_s in POOL_STOP_GRACE_S:
                if not self._signal(signal.SIGTERM) or self._gone_within(grace_s):
                    break
        finally:
            self._signal(signal.SIGKILL)
            self.proc.wait()
            self.log.unlink(missing_ok=True)

    def _gone_within(self, grace_s: float) -> bool:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self.proc.poll()
            if not self._signal(0):
                return True
            time.sleep(0.05)
        return False

    def _signal(self, sig: int) -> bool:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return False
        return True


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

    The same ``lua/save.lua`` call as ``RedisSessionCache.save`` (its KEYS and ARGV as the
    script header lists them), ``chunk`` calls per round trip: a fast fill for benchmarks
    that need many live sessions. Returns how many saves the script accepted.
    """
    from cache.clock import now_iso
    from cache.records import RunRef

    encoded = [cache.codec.write_fields(write) for write in writes]
    ttl_ms = cache.settings.active_ttl_s * 1000
    accepted = 0
    pipe = cache.client.pipeline(transaction=False)
    for i, key in enumerate(keys):
        run = RunRef(key.tenant_id, key.workflow_run_id)
        names = [
            cache.keys.session(key),
            cache.keys.run(run),
            cache.keys.run_sessions(run),
            cache.keys.dirty(cache.keys.shard_of_key(key)),
        ]
        args = ["", 0, now_iso(), ttl_ms, *encoded[i % len(encoded)]]
        cache.scripts.save(keys=names, args=args, client=pipe)
        if len(pipe) >= chunk or i == len(keys) - 1:
            accepted += sum(1 for reply in pipe.execute() if reply[0] == 0)
    return accepted


def install_write_counter(db_url: str, table: str = "workflow_agent_runtime_sessions") -> None:
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
        found = cache.dirty_entries(shard, older_than_ms=cache.server_time_ms(), limit=entries)
        fields = ("version", "flushed_version", "status")
        shards[str(shard)] = {
            "dirty": count,
            "lock_pttl_ms": cache.client.pttl(cache.keys.flush_lock(shard)),
            "entries": [
                {
                    "since_ms": e.since_ms,
                    **dict(zip(fields, _text(cache.client.hmget(e.name, fields)), strict=True)),
                    "postgres_version": _row_version(ctx, e.name),
                }
                for e in found
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


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Move everything allocated so far out of the cyclic GC's sight for the duration.

    A benchmark that prepares a large baseline data set up front (a million objects) would
    otherwise make every collection during the arm under test rescan that data, a cost no
    real worker process pays.
    """
    import gc

    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def cpu_warm() -> Iterator[None]:
    """A one-core busy-loop process for the duration: keeps the vCPUs out of their idle
    states (the baselines' "CPU-warm" rows), so wake-up latency stops dominating round trips."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "while True: pass"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def spread_text(values: Sequence[float], unit: str = "", digits: int = 2) -> str:
    """``"min-max over N reps"``, the one-line spread of repeated measurements."""
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:.{digits}f}-{high:.{digits}f}{unit} over {len(values)} reps"
