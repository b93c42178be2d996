"""fault_recovery: how long a change can wait for Postgres after flushing workers are killed.

A real ``agent-sessions worker`` pool (2 processes + the flush trigger, default settings:
``flush_delay_ms`` 1000, ``flush_lock_ttl_s`` 1) flushes while a thread of this process saves
~8 KB snapshots round-robin over 200 sessions at a steady rate. Meanwhile this process
SIGKILLs the worker that holds a shard's flush lock (the lock's value names the holder's pid),
i.e. a worker in the middle of a flush, 10 times (``--quick``: 3). The load goes on for a
while after the last kill, then stops and the pool flushes the rest.

Measured from the outside: a row trigger logs every Postgres write of a session (version,
``flushed_at``), and every save's client time is recorded with the version it returned. A
save lands at the first write of its session at a version at least its own. For every save
that landed after the last kill, its wait after the kill is ``landed - max(saved, killed)``.
value = the longest such wait (s); ratio = value / flush_delay; goal ratio <= 3.
"""

from __future__ import annotations

import bisect
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from bench.flush_lag import FlushLog, install_flush_log, read_flush_log
from bench.harness import HarnessError, Result, make_result, median, private_redis
from bench.hot_path import build_keys, build_write
from bench.stack import (
    WorkerPool,
    bench_settings,
    migrated_database,
    wait_for,
    worker_context,
    worker_pool,
)
from cache.records import SessionKey
from workers.context import WorkerContext
from workers.drain import dirty_total

NAME = "fault_recovery"
METRIC = "longest wait of a change after the last of N SIGKILLs of flushing workers"
GOAL = "<= 3"
WORKERS = 2
SESSIONS = 200
RATE_PER_S = 400
SHARDS = 16


@dataclass(frozen=True)
class Plan:
    kills: int
    kill_every_s: float
    tail_s: float


QUICK = Plan(kills=3, kill_every_s=0.8, tail_s=4.0)
FULL = Plan(kills=10, kill_every_s=0.8, tail_s=10.0)


@dataclass
class Saves:
    """Client time of each save, per session, by the version it returned."""

    times: dict[tuple[str, str], dict[int, float]] = field(default_factory=dict)
    count: int = 0


class Loader(threading.Thread):
    """Saves round-robin at :data:`RATE_PER_S` until stopped, timing every save."""

    def __init__(self, ctx: WorkerContext, keys: Sequence[SessionKey]) -> None:
        super().__init__(name="loader", daemon=True)
        self.ctx, self.keys, self.saves = ctx, keys, Saves()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        write, cache = build_write(), self.ctx.cache
        times = [self.saves.times.setdefault((k.workflow_run_id, k.node_id), {}) for k in self.keys]
        start = time.monotonic()
        try:
            while not self.stop.is_set():
                i = self.saves.count % len(self.keys)
                before = time.time()
                times[i][cache.save(self.keys[i], write)] = before
                self.saves.count += 1
                ahead = self.saves.count / RATE_PER_S - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def kill_a_flusher(ctx: WorkerContext, pool: WorkerPool, timeout_s: float = 30.0) -> float:
    """SIGKILL the pool worker that holds a flush lock (so: mid-flush); the kill's time."""
    cache = ctx.cache
    locks = [cache.keys.flush_lock(shard) for shard in cache.keys.all_shards()]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tokens: list[bytes | None] = cache.client.mget(locks)  # type: ignore[assignment]
        for token in tokens:
            pid = int(token.split(b":")[1]) if token else 0
            if pid and _in_pool(pid, pool):
                os.kill(pid, signal.SIGKILL)
                return time.time()
        time.sleep(0.002)
    raise HarnessError("no flush lock was seen held by a pool worker")


def _in_pool(pid: int, pool: WorkerPool) -> bool:
    try:
        return os.getpgid(pid) == pool.proc.pid
    except ProcessLookupError:
        return False


def waits_after(saves: Saves, log: FlushLog, killed_at: float) -> list[float]:
    """For every save that landed after ``killed_at``: ``landed - max(saved, killed_at)``."""
    out = []
    for key, times in saves.times.items():
        versions, written_at = log[key]
        for version, saved in times.items():
            first = bisect.bisect_left(versions, version)
            if first == len(versions):
                raise HarnessError(f"{key} version {version} never reached Postgres")
            if written_at[first] > killed_at:
                out.append(written_at[first] - max(saved, killed_at))
    return out


@contextmanager
def _stack() -> Iterator[tuple[WorkerContext, str, WorkerPool]]:
    with ExitStack() as stack:
        redis_url = stack.enter_context(private_redis())
        db_url = stack.enter_context(migrated_database())
        install_flush_log(db_url)
        settings = bench_settings(redis_url, db_url, shards=SHARDS)
        ctx = stack.enter_context(worker_context(settings))
        yield ctx, db_url, stack.enter_context(worker_pool(settings, WORKERS))


def _measure(plan: Plan) -> dict[str, Any]:
    keys = build_keys(SESSIONS)
    with _stack() as (ctx, db_url, pool):
        loader = Loader(ctx, keys)
        loader.start()
        time.sleep(2 * ctx.settings.flush_delay_ms / 1000)  # flushing at its steady pace
        kills = []
        for n in range(plan.kills):
            kills.append(kill_a_flusher(ctx, pool))
            print(f"  kill {n + 1}/{plan.kills}", flush=True)
            time.sleep(plan.kill_every_s)
        time.sleep(plan.tail_s)
        loader.stop.set()
        loader.join()
        if loader.error is not None:
            raise HarnessError(f"the load failed: {loader.error!r}")
        settle = wait_for(lambda: not dirty_total(ctx), "the pool to flush the rest", poll_s=0.05)
        waits = waits_after(loader.saves, read_flush_log(db_url), kills[-1])
        return {
            "waits": waits,
            "kills": len(kills),
            "saves": loader.saves.count,
            "settle_s": settle,
            "delay_s": ctx.settings.flush_delay_ms / 1000,
            "lock_ttl_s": ctx.settings.flush_lock_ttl_s,
        }


def _result(facts: dict[str, Any], plan: Plan) -> Result:
    waits, delay_s = facts["waits"], facts["delay_s"]
    longest = max(waits)
    extra = {
        "spread": f"median wait {median(waits):.2f} s over {len(waits)} saves after the last kill",
        "longest_wait_s": round(longest, 3),
        "median_wait_s": round(median(waits), 3),
        "saves_after_last_kill": len(waits),
        "kills": facts["kills"],
        "saves": facts["saves"],
        "settle_after_load_s": round(facts["settle_s"], 2),
        "flush_delay_s": delay_s,
        "flush_lock_ttl_s": facts["lock_ttl_s"],
        "sessions": SESSIONS,
        "saves_per_s": RATE_PER_S,
        "workers": WORKERS,
        "kill_every_s": plan.kill_every_s,
        "tail_s": plan.tail_s,
    }
    return make_result(
        NAME,
        METRIC,
        value=round(longest, 3),
        baseline=delay_s,
        goal=GOAL,
        unit="s",
        extra=extra,
    )


def run(quick: bool) -> Result:
    plan = QUICK if quick else FULL
    return _result(_measure(plan), plan)
