"""coalescing: how many Postgres row writes a hot loop of saves costs.

10 sessions (one workflow run, ten Agent nodes) x 1,000 loop iterations each, interleaved
node by node, through ``SessionLifecycle.enter`` + ``finish(succeeded)`` with ~8 KB
snapshots, while a real ``agent-sessions worker`` pool (2 processes + the flush trigger)
flushes behind them with ``flush_delay_ms`` = 200. After the loop the pool drains what is
left. value = Postgres row writes, from the store's own counter (``rows_flushed`` delta) and
cross-checked by a row trigger on the table that counts every INSERT and UPDATE; baseline =
saves (what the Postgres-only original writes: one row write per save). ratio =
writes / saves. Repeated on a fresh run id per repetition; the median repetition is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from bench.harness import (
    Result,
    make_result,
    private_redis,
    spread_text,
)
from bench.loop_vs_postgres import LoopWorkload, ours_iteration
from bench.stack import (
    bench_settings,
    counted_writes,
    install_write_counter,
    migrated_database,
    wait_for,
    worker_context,
    worker_pool,
)
from workers.context import WorkerContext
from workers.drain import dirty_total

NAME = "coalescing"
METRIC = "Postgres row writes per save (10 sessions x 1,000 saves)"
GOAL = "<= 0.02"
FLUSH_DELAY_MS = 200
WORKERS = 2
SESSIONS = 10


@dataclass(frozen=True)
class Plan:
    saves_per_session: int
    reps: int


QUICK = Plan(saves_per_session=300, reps=2)
FULL = Plan(saves_per_session=1000, reps=3)


@dataclass(frozen=True)
class Rep:
    saves: int
    rows_flushed: int
    trigger_writes: int
    loop_s: float
    drain_s: float


@contextmanager
def _stack() -> Iterator[tuple[WorkerContext, str]]:
    with ExitStack() as stack:
        redis_url = stack.enter_context(private_redis())
        db_url = stack.enter_context(migrated_database())
        install_write_counter(db_url)
        settings = bench_settings(redis_url, db_url, flush_delay_ms=FLUSH_DELAY_MS)
        ctx = stack.enter_context(worker_context(settings))
        stack.enter_context(worker_pool(settings, WORKERS))
        yield ctx, db_url


def _one_rep(ctx: WorkerContext, db_url: str, plan: Plan, seed: int) -> Rep:
    from agent_sessions.lifecycle import SessionLifecycle

    workload = LoopWorkload.build(runs=1, nodes=SESSIONS, seed=seed)
    workload.order.sort()  # node 0, 1, … 9, 0, 1, …: every session is hot all loop long
    iteration = ours_iteration(SessionLifecycle(ctx), workload)
    flushed0, writes0 = ctx.cache.counters().get("rows_flushed", 0), counted_writes(db_url)
    saves = plan.saves_per_session * SESSIONS
    start = time.monotonic()
    for _ in range(saves):
        iteration()
    loop_s = time.monotonic() - start
    drain_s = wait_for(lambda: not dirty_total(ctx), "the loop's sessions to be flushed")
    return Rep(
        saves=saves,
        rows_flushed=ctx.cache.counters().get("rows_flushed", 0) - flushed0,
        trigger_writes=counted_writes(db_url) - writes0,
        loop_s=round(loop_s, 2),
        drain_s=round(drain_s, 2),
    )


def _measure(plan: Plan) -> list[Rep]:
    reps = []
    with _stack() as (ctx, db_url):
        for i in range(plan.reps):
            rep = _one_rep(ctx, db_url, plan, seed=100 + i)
            print(
                f"  rep {i + 1}/{plan.reps}: {rep.saves} saves in {rep.loop_s:.1f} s -> "
                f"{rep.rows_flushed} rows flushed (trigger counted {rep.trigger_writes}), "
                f"drained {rep.drain_s:.2f} s after the loop",
                flush=True,
            )
            reps.append(rep)
    return reps


def _result(reps: list[Rep]) -> Result:
    ratios = [rep.rows_flushed / rep.saves for rep in reps]
    middle = sorted(reps, key=lambda rep: rep.rows_flushed)[(len(reps) - 1) // 2]
    extra: dict[str, Any] = {
        "spread": spread_text(ratios, digits=4),
        "ratios": [round(r, 4) for r in ratios],
        "rows_flushed": [rep.rows_flushed for rep in reps],
        "trigger_counted_writes": [rep.trigger_writes for rep in reps],
        "counters_agree": all(rep.rows_flushed == rep.trigger_writes for rep in reps),
        "loop_s": [rep.loop_s for rep in reps],
        "drain_after_loop_s": [rep.drain_s for rep in reps],
        "saves_per_s": round(statistics.median(rep.saves / rep.loop_s for rep in reps)),
        "writes_per_session_per_s": round(
            statistics.median(rep.rows_flushed / SESSIONS / rep.loop_s for rep in reps), 2
        ),
        "trigger_passes_per_s": round(2000 / FLUSH_DELAY_MS, 1),
        "writes_per_session_per_s_if_flushed_once_per_delay": round(1000 / FLUSH_DELAY_MS, 1),
        "flush_delay_ms": FLUSH_DELAY_MS,
        "flush_workers": WORKERS,
        "sessions": SESSIONS,
        "what": (
            "SessionLifecycle enter+finish, 10 sessions of one run saved round-robin; "
            "writes = rows_flushed counter delta (trigger-counted row writes must agree); "
            "baseline = saves = the original's one row write per save"
        ),
    }
    return make_result(
        NAME,
        METRIC,
        value=float(middle.rows_flushed),
        baseline=float(middle.saves),
        goal=GOAL,
        unit="rows",
        extra=extra,
    )


def run(quick: bool) -> Result:
    return _result(_measure(QUICK if quick else FULL))
