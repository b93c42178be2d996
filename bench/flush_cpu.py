"""flush_cpu: what the worker pool's CPU costs per row it flushes, and what it costs idle.

A real ``agent-sessions worker -n 2`` pool (supervisor, 2 RQ workers, flush trigger,
scheduler; default ``flush_delay_ms`` 1000, 256 shards) behind ``loop_vs_postgres``'
iteration (:func:`bench.loop_vs_postgres.ours_iteration`) run flat out in this process over
100 sessions spread over 20 workflow runs (5 nodes each, so over ~20 shards), saving
:mod:`bench.agent_state`'s states (``--snapshot realistic`` by default). Each repetition:

1. **idle**: the pool with nothing to flush for ``seconds``: the pool's CPU (the sum over its
   process group of ``/proc/<pid>/stat`` utime + stime, + cutime + cstime of reaped
   children) and the Redis server's (``INFO cpu``, and ``INFO commandstats`` per command);
2. **load**: the loop for ``seconds``, then until the pool has flushed everything; the pool's
   CPU and the rows it wrote (``<prefix>:stats`` ``rows_flushed``).

value = (load CPU - idle CPU per second x load window) / rows, in ms per row (goal <= 0.5),
the median over repetitions. Also: the Redis server's CPU per second while the pool is idle
(the trigger's passes over every shard, RQ's blocking waits and heartbeats), against the same
server with no pool, measured before the pool starts; and the idle pool's own CPU. ``/proc``
counts CPU in clock ticks (10 ms) per process, so the split by role (``extra``) of a short
(``--quick``) run is coarse.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from bench.agent_state import AgentStates, agent_states
from bench.cpu import (
    RedisProbe,
    command_delta,
    cpu_delta,
    group_cpu_s,
    idle_cpu_rate,
    top_commands,
)
from bench.harness import Result, make_result, median, private_redis
from bench.loop_vs_postgres import LoopWorkload, ours_iteration
from bench.stack import (
    WorkerPool,
    bench_settings,
    migrated_database,
    wait_for,
    worker_context,
    worker_pool,
)
from workers.drain import dirty_total, drain

if TYPE_CHECKING:
    from workers.context import WorkerContext

NAME = "flush_cpu"
METRIC = "worker pool CPU per flushed row under loop load (idle polling subtracted)"
GOAL = "<= 0.5"
WORKERS = 2
RUNS, NODES = 20, 5
POOL_SETTLE_S = 2.0
WHAT = (
    f"agent-sessions worker -n {WORKERS} (default flush_delay_ms 1000, 256 shards) behind "
    "loop_vs_postgres' iteration run flat out in the benchmark's process over "
    f"{RUNS * NODES} sessions of {RUNS} runs; pool CPU = /proc utime+stime(+cutime+cstime) "
    "summed over its process group, over the load window (the loop, then until all is "
    "flushed) minus the same pool's idle CPU per second x that window; rows = rows_flushed; "
    "Redis CPU from INFO cpu"
)


@dataclass(frozen=True)
class Plan:
    seconds: float
    reps: int


QUICK = Plan(seconds=3.0, reps=1)
FULL = Plan(seconds=10.0, reps=3)


@dataclass(frozen=True)
class Window:
    """One measured stretch: its length, CPU seconds per pool process, the Redis server's CPU
    seconds and its per-command time."""

    seconds: float
    pool: dict[int, float]
    server: float
    commands: dict[str, tuple[int, float]]

    @property
    def pool_s(self) -> float:
        return sum(self.pool.values())


@dataclass(frozen=True)
class Rep:
    idle: Window
    load: Window
    iterations: int
    loop_s: float
    rows: int
    flushes: int

    def net_cpu_s(self, pids: Sequence[int] | None = None) -> float:
        """The load window's pool CPU (of ``pids``, default all) minus the idle rate's share."""
        chosen = self.load.pool if pids is None else pids
        load = sum(self.load.pool.get(pid, 0.0) for pid in chosen)
        idle = sum(self.idle.pool.get(pid, 0.0) for pid in chosen)
        return load - idle / self.idle.seconds * self.load.seconds

    def ms_per_row(self, pids: Sequence[int] | None = None) -> float:
        return self.net_cpu_s(pids) * 1000 / max(self.rows, 1)


def measure_window(pool: WorkerPool, probe: RedisProbe, body: Callable[[], object]) -> Window:
    """Run ``body`` and read the pool's and the server's CPU around it."""
    commands, server = probe.commands(), probe.cpu_s()
    cpu, start = group_cpu_s(pool.proc.pid), time.perf_counter()
    body()
    seconds, after = time.perf_counter() - start, group_cpu_s(pool.proc.pid)
    server = probe.cpu_s() - server
    return Window(seconds, cpu_delta(cpu, after), server, command_delta(commands, probe.commands()))


def _loop_then_settle(ctx: WorkerContext, ours: Callable[[], object], seconds: float) -> int:
    """Run ``ours`` flat out for ``seconds``, then wait for the pool to flush it all."""
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        ours()
        count += 1
    wait_for(lambda: not dirty_total(ctx), "the pool to flush the loop's sessions", poll_s=0.05)
    return count


def one_rep(
    ctx: WorkerContext, pool: WorkerPool, probe: RedisProbe, ours: Callable[[], object], s: float
) -> Rep:
    idle = measure_window(pool, probe, lambda: time.sleep(s))
    before = ctx.cache.counters()
    counted: list[int] = []
    load = measure_window(pool, probe, lambda: counted.append(_loop_then_settle(ctx, ours, s)))
    after = ctx.cache.counters()
    rows, flushes = (
        after.get(name, 0) - before.get(name, 0) for name in ("rows_flushed", "flushes")
    )
    rep = Rep(idle, load, counted[0], s, rows, flushes)
    print(
        f"  idle pool {idle.pool_s * 1000 / idle.seconds:5.1f} ms/s, Redis "
        f"{idle.server * 1000 / idle.seconds:5.2f} ms/s; load: {rep.iterations:,} iterations, "
        f"{rows:,} rows in {load.seconds:.1f} s, {rep.ms_per_row():.3f} ms CPU per row",
        flush=True,
    )
    return rep


def pool_roles(ctx: WorkerContext, pool: WorkerPool) -> dict[str, list[int]]:
    """The pool's pids by role: ``supervisor``, ``rq_workers``, ``trigger``, ``other``."""
    from rq import Worker
    from rq.serializers import JSONSerializer

    workers = Worker.all(connection=ctx.queue_redis, serializer=JSONSerializer)
    triggers = ctx.cache.client.zrange(ctx.cache.keys.triggers, 0, -1)
    roles: dict[str, list[int]] = {
        "supervisor": [pool.proc.pid],
        "rq_workers": [int(w.pid) for w in workers if w.pid],
        "trigger": [int(t.decode().rsplit(":", 1)[1]) for t in triggers],  # type: ignore[union-attr]
    }
    known = {pid for pids in roles.values() for pid in pids}
    roles["other"] = [pid for pid in group_cpu_s(pool.proc.pid) if pid not in known]
    return roles


def _setup(ctx: WorkerContext, states: AgentStates) -> Callable[[], object]:
    """The loop's iteration over its sessions, created and flushed."""
    from agent_sessions.lifecycle import SessionLifecycle

    workload = LoopWorkload.build(RUNS, NODES, seed=31, states=states)
    ours = ours_iteration(SessionLifecycle(ctx), workload)
    for _ in workload.scopes:
        ours()
    drain(ctx)
    return ours


def _measure(plan: Plan, states: AgentStates) -> tuple[list[Rep], dict[str, Any]]:
    with ExitStack() as stack:
        redis_url = stack.enter_context(private_redis())
        db_url = stack.enter_context(migrated_database())
        settings = bench_settings(redis_url, db_url)
        ctx = stack.enter_context(worker_context(settings))
        ours = _setup(ctx, states)
        probe = RedisProbe(stack.enter_context(redis.Redis.from_url(redis_url)))
        alone = idle_cpu_rate(probe, plan.seconds)
        print(f"  Redis alone: {alone * 1000:.2f} ms/s; starting the pool", flush=True)
        pool = stack.enter_context(worker_pool(settings, WORKERS))
        time.sleep(POOL_SETTLE_S)
        reps = [one_rep(ctx, pool, probe, ours, plan.seconds) for _ in range(plan.reps)]
        roles = pool_roles(ctx, pool)
    facts = {
        **states.facts(),
        "redis_alone_cpu_ms_per_s": round(alone * 1000, 3),
        "pool_roles": {role: len(pids) for role, pids in roles.items()},
        "ms_per_row_by_role": {
            role: round(median([rep.ms_per_row(pids) for rep in reps]), 4)
            for role, pids in roles.items()
        },
        "idle_pool_ms_per_s_by_role": {
            role: round(median([_idle_rate(rep.idle, pids) * 1000 for rep in reps]), 3)
            for role, pids in roles.items()
        },
    }
    return reps, facts


def _idle_rate(window: Window, pids: Sequence[int]) -> float:
    return sum(window.pool.get(pid, 0.0) for pid in pids) / window.seconds


def _per_s(windows: Sequence[Window], read: Callable[[Window], float]) -> float:
    """The median over ``windows`` of ``read(window)`` per second, in ms/s."""
    return round(median([read(w) * 1000 / w.seconds for w in windows]), 3)


def _idle_commands(windows: Sequence[Window], top: int = 6) -> dict[str, float]:
    """Redis µs per second of each command while the pool idles, the ``top`` largest."""
    seconds = sum(w.seconds for w in windows)
    return top_commands((w.commands for w in windows), seconds, top=top, digits=1)


def _also(reps: Sequence[Rep], alone_ms_per_s: float) -> list[dict[str, Any]]:
    idle = [rep.idle for rep in reps]
    return [
        {
            "metric": "Redis server CPU while the pool idles (trigger passes, RQ waits)",
            "value": _per_s(idle, lambda w: w.server),
            "baseline": alone_ms_per_s,
            "unit": "ms/s",
            "note": "baseline = the same server before the pool started",
        },
        {
            "metric": "the idle pool's own CPU (all its processes)",
            "value": _per_s(idle, lambda w: w.pool_s),
            "baseline": None,
            "unit": "ms/s",
            "note": f"{WORKERS} RQ workers, trigger, scheduler, supervisor",
        },
    ]


def _result(reps: Sequence[Rep], plan: Plan, facts: dict[str, Any]) -> Result:
    per_row = [round(rep.ms_per_row(), 4) for rep in reps]
    gross = [rep.load.pool_s * 1000 / max(rep.rows, 1) for rep in reps]
    rows = sum(rep.rows for rep in reps)
    extra: dict[str, Any] = {
        "spread": f"{min(per_row):.3f}-{max(per_row):.3f} ms per row over {len(reps)} reps",
        "also": _also(reps, facts["redis_alone_cpu_ms_per_s"]),
        "ms_per_row_reps": per_row,
        "gross_ms_per_row": round(median(gross), 4),
        "rows_flushed": [rep.rows for rep in reps],
        "iterations_per_s": round(sum(r.iterations for r in reps) / sum(r.loop_s for r in reps)),
        "saves_per_row": round(sum(rep.iterations for rep in reps) / max(rows, 1), 1),
        "flushes": [rep.flushes for rep in reps],
        "rows_per_flush": round(rows / max(sum(rep.flushes for rep in reps), 1), 1),
        "ms_per_flush": round(median([r.net_cpu_s() * 1000 / max(r.flushes, 1) for r in reps]), 2),
        "load_window_s": [round(rep.load.seconds, 2) for rep in reps],
        "idle_redis_us_per_s_by_command": _idle_commands([rep.idle for rep in reps]),
        "sessions": f"{RUNS * NODES} ({RUNS} runs x {NODES} nodes)",
        "flush_workers": WORKERS,
        "window_seconds": plan.seconds,
        "reps": plan.reps,
        "what": WHAT,
        **facts,
    }
    return make_result(
        NAME,
        METRIC,
        value=round(median(per_row), 4),
        baseline=None,
        goal=GOAL,
        unit="ms",
        goal_on="value",
        extra=extra,
    )


def run(quick: bool, snapshot: str | None = None) -> Result:
    plan = QUICK if quick else FULL
    reps, facts = _measure(plan, agent_states(snapshot))
    return _result(reps, plan, facts)
