"""cleanup: ending a workflow run with 100 Agent sessions, ours against the original.

A run with 100 sessions (100 Agent nodes, ~8 KB snapshots, four replayable layer specs
each) ends. The loopback fake agent backend runs as its own process (10 ms per run).

- **ours**: ``SessionLifecycle.workflow_ended`` — ``end_owner`` + ``begin_cleanup`` (Lua: from
  then on nothing of the run can be resumed or saved), an urgent flush, one cleanup job per
  session — then a real ``agent-sessions worker`` pool (2 processes) runs the jobs: replay
  the specs, create the cleanup run, wait for its terminal status, mark ``cleaned``. Timed:
  the Lua part (``end_owner`` + ``begin_cleanup``, wrapped timers), the whole call, and the time
  until all 100 sessions are ``cleaned``.
- **original** (:mod:`bench.pg_original`): the terminal-event layer's in-line loop in one
  process — list the run's active rows, then per row: create the cleanup run, wait for it,
  ``mark_cleaned`` (one ORM transaction). A row stays resumable until its own cleanup is done,
  so the run is fully unresumable only when the loop ends, and the workflow's terminal event
  handling is blocked for as long.

value = ours' time until all 100 are cleaned; baseline = the original's loop; ratio =
ours / original (goal <= 1: the queue is no slower end to end). Also reported: the time until
nothing is resumable (ours: the Lua part; original: its whole loop). Arms alternate, fresh
run ids per repetition, same backend, same Redis/Postgres servers.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from agent_backend.client import AgentBackendClient
from bench.harness import (
    Result,
    make_result,
    median,
    private_redis,
    spread_text,
)
from bench.hot_path import build_write
from bench.loop_vs_postgres import LoopWorkload
from bench.pg_original import (
    OriginalSessionStore,
    cleanup_run_in_line,
    create_engine,
    create_table,
)
from bench.stack import (
    WorkerPool,
    bench_settings,
    bulk_save,
    migrated_database,
    wait_for,
    worker_context,
    worker_pool,
)
from cache.records import Scope, SessionKey
from workers.context import WorkerContext

NAME = "cleanup"
METRIC = "workflow end, 100 sessions: until all cleaned on the backend"
GOAL = "<= 1"
SESSIONS = 100
WORKERS = 2
_LISTENING = re.compile(r"listening on (http://\S+)")
T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    reps: int


QUICK = Plan(reps=1)
FULL = Plan(reps=3)


@dataclass
class OursRep:
    lua_ms: float
    call_ms: float
    cleaned_s: float
    unresumable_after_call: bool


@dataclass
class Measured:
    ours: list[OursRep] = field(default_factory=list)
    original_s: list[float] = field(default_factory=list)
    job_ms: list[float] = field(default_factory=list)  # RQ-logged cleanup job durations


# --------------------------------------------------------------------------------- servers


@contextmanager
def fake_backend() -> Iterator[str]:
    """``python -m agent_sessions.testing.fake_backend`` as its own process; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_sessions.testing.fake_backend", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout is not None else ""
        match = _LISTENING.search(line)
        if match is None:
            raise RuntimeError(f"the fake agent backend did not start: {line!r}")
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Timed:
    """Wraps bound methods of one object with wall-clock timers (milliseconds, summed)."""

    def __init__(self) -> None:
        self.ms = 0.0

    def wrap(self, fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> T:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms += (time.perf_counter() - start) * 1000

        return timed


# --------------------------------------------------------------------------------- arms


def _scopes(seed: int) -> list[Scope]:
    return LoopWorkload.build(runs=1, nodes=SESSIONS, seed=seed).scopes


def _keys(scopes: list[Scope]) -> list[SessionKey]:
    return [key for scope in scopes if (key := scope.key) is not None]


def _statuses(ctx: WorkerContext, keys: list[SessionKey]) -> list[bytes | None]:
    pipe = ctx.cache.client.pipeline(transaction=False)
    for key in keys:
        pipe.hget(ctx.cache.keys.session(key), "status")
    return cast(list[bytes | None], pipe.execute())


def ours_rep(ctx: WorkerContext, seed: int) -> OursRep:
    """Save 100 sessions, end the run, wait until every one is ``cleaned``."""
    from agent_sessions.lifecycle import SessionLifecycle

    scopes = _scopes(seed)
    keys = _keys(scopes)
    bulk_save(ctx.cache, keys, [build_write()])
    lua = Timed()
    lifecycle = SessionLifecycle(ctx)
    cache = cast(Any, ctx.cache)
    cache.end_owner, cache.begin_cleanup = lua.wrap(cache.end_owner), lua.wrap(cache.begin_cleanup)
    try:
        start = time.perf_counter()
        report = lifecycle.workflow_ended(keys[0].tenant_id, keys[0].owner_id, "succeeded")
        call_ms = (time.perf_counter() - start) * 1000
    finally:
        del cache.end_owner, cache.begin_cleanup
    unresumable = all(status != b"active" for status in _statuses(ctx, keys))
    if report.cleanups_enqueued != SESSIONS:
        raise RuntimeError(f"workflow_ended: {report}")
    wait_for(
        lambda: all(status == b"cleaned" for status in _statuses(ctx, keys)),
        "every session to be cleaned",
        timeout_s=120,
    )
    return OursRep(lua.ms, call_ms, time.perf_counter() - start, unresumable)


def original_rep(store: OriginalSessionStore, backend: AgentBackendClient, seed: int) -> float:
    """Save 100 rows, then the original's in-line cleanup loop; seconds it took."""
    workload = LoopWorkload.build(runs=1, nodes=SESSIONS, seed=seed)
    for scope in workload.scopes:
        store.save_active_snapshot(
            scope,
            backend_run_id="previous-run",
            snapshot=workload.snapshot_proto,
            layer_specs=workload.specs_proto,
        )
    run_id = workload.scopes[0].workflow_run_id or ""
    start = time.perf_counter()
    cleaned, left = cleanup_run_in_line(store, backend, run_id)
    seconds = time.perf_counter() - start
    if cleaned != SESSIONS or left:
        raise RuntimeError(f"original cleanup: {cleaned} cleaned, {left} left active")
    return seconds


# --------------------------------------------------------------------------------- running


@contextmanager
def _stack() -> Iterator[
    tuple[WorkerContext, OriginalSessionStore, AgentBackendClient, WorkerPool]
]:
    with ExitStack() as stack:
        backend_url = stack.enter_context(fake_backend())
        redis_url = stack.enter_context(private_redis())
        db_url = stack.enter_context(migrated_database())
        create_table(db_url)
        settings = bench_settings(redis_url, db_url, agent_backend_url=backend_url)
        ctx = stack.enter_context(worker_context(settings))
        engine = create_engine(db_url)
        stack.callback(engine.dispose)
        client = stack.enter_context(AgentBackendClient(backend_url))
        pool = stack.enter_context(worker_pool(settings, WORKERS))
        yield ctx, OriginalSessionStore(engine), client, pool


def _measure(plan: Plan) -> Measured:
    measured = Measured()
    with _stack() as (ctx, store, client, pool):
        for rep in range(plan.reps):
            order = ("ours", "original") if rep % 2 == 0 else ("original", "ours")
            for arm in order:
                if arm == "ours":
                    measured.ours.append(ours_rep(ctx, seed=500 + rep))
                else:
                    measured.original_s.append(original_rep(store, client, seed=700 + rep))
            ours = measured.ours[-1]
            print(
                f"  rep {rep + 1}/{plan.reps}: ours unresumable after {ours.lua_ms:.1f} ms "
                f"(call {ours.call_ms:.0f} ms), all cleaned {ours.cleaned_s:.2f} s; "
                f"original in-line loop {measured.original_s[-1]:.2f} s",
                flush=True,
            )
        measured.job_ms = [s * 1000 for s in pool.job_seconds("cleanup_job")]
    return measured


def _result(measured: Measured) -> Result:
    cleaned = median([rep.cleaned_s for rep in measured.ours])
    original = median(measured.original_s)
    lua_ms = median([rep.lua_ms for rep in measured.ours])
    ratios = [o.cleaned_s / b for o, b in zip(measured.ours, measured.original_s, strict=True)]
    extra: dict[str, Any] = {
        "spread": f"ratio {spread_text(ratios)}",
        "also": [
            {
                "metric": "time until no session of the run is resumable",
                "value": round(lua_ms, 1),
                "unit": "ms",
                "baseline": round(original * 1000),
                "note": "ours: end_owner + begin_cleanup (Lua); original: its whole loop",
            }
        ],
        "ours_unresumable_ms": [round(rep.lua_ms, 1) for rep in measured.ours],
        "ours_workflow_ended_call_ms": [round(rep.call_ms, 1) for rep in measured.ours],
        "ours_all_cleaned_s": [round(rep.cleaned_s, 2) for rep in measured.ours],
        "original_in_line_s": [round(s, 2) for s in measured.original_s],
        "unresumable_right_after_call": all(rep.unresumable_after_call for rep in measured.ours),
        "cleanup_per_session_ms": {
            "ours_wall": round(cleaned / SESSIONS * 1000, 1),
            "original": round(original / SESSIONS * 1000, 1),
        },
        "cleanup_job_ms_inside_rq_median": round(median(measured.job_ms), 1)
        if measured.job_ms
        else None,
        "sessions": SESSIONS,
        "workers": WORKERS,
        "what": (
            "same fake backend process (10 ms runs); ours = workflow_ended then RQ cleanup "
            "jobs on 2 workers (create run, wait for terminal status, mark cleaned); original "
            "= in-line loop: create, wait, ORM mark_cleaned per active row; the original "
            "blocks the workflow's terminal event for the whole loop, ours for the call"
        ),
    }
    return make_result(
        NAME,
        METRIC,
        value=round(cleaned, 3),
        baseline=round(original, 3),
        goal=GOAL,
        unit="s",
        extra=extra,
    )


def run(quick: bool) -> Result:
    return _result(_measure(QUICK if quick else FULL))
