"""parallel_loops: loop throughput with N processes, ours against the Postgres-only original.

N loop processes (N = 1, 2, 4, 8; spawned once, each with its own 2 workflow runs x 5 Agent
nodes) run the ``loop_vs_postgres`` iteration flat out for a fixed time, all starting at the
same instant: **ours** (the real node path of ``loop_vs_postgres``: ``enter``,
``build_request`` and its JSON, the backend's answer decoded, ``RunOutcome.from_status``,
``finish``, with a 2-process ``agent-sessions worker`` pool flushing behind; the backend's
own time left out) or the **original** (:mod:`bench.pg_original`,
ORM load + read-then-write save with a commit). Total iterations/s per arm and N; the arms
alternate at every N and repetition, and after an ours phase the pool is let finish its
flushes before the next phase starts, so the original never runs in ours' shadow.

value = ours at the largest N, baseline = the original at that N, ratio = ours / original
(goal >= 10, the throughput mirror of ``loop_vs_postgres``' time ratio <= 0.1); the whole
curves are in ``extra`` and drawn in ``docs/parallel_loops.png``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.harness import (
    HarnessError,
    Result,
    make_result,
    median,
    private_redis,
)
from bench.loop_vs_postgres import LoopWorkload, loop_arms
from bench.pg_original import create_table
from bench.plot import DOCS_DIR, plot_parallel_loops
from bench.stack import (
    backlog_diagnostics,
    bench_settings,
    migrated_database,
    wait_for,
    worker_context,
    worker_pool,
)
from cache.settings import Settings
from workers.context import WorkerContext
from workers.drain import dirty_total, drain

NAME = "parallel_loops"
METRIC = "loop iterations/s at N processes, ours / original"
GOAL = ">= 10"
WORKERS = 2
RUNS, NODES = 2, 5
PLOT = "parallel_loops.png"
START_LEAD_S = 0.3
SETTLE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    seconds: float
    reps: int


QUICK = Plan(sizes=(1, 2, 4, 8), seconds=1.0, reps=1)
FULL = Plan(sizes=(1, 2, 4, 8), seconds=2.5, reps=3)


# --------------------------------------------------------------------------------- children


def loop_process(index: int, settings: dict[str, Any], conn: Connection) -> None:
    """One loop process: set both arms up, then run phases on command until told to stop."""
    workload = LoopWorkload.build(RUNS, NODES, seed=1000 + index)
    with loop_arms(Settings(**settings), workload) as arms:
        conn.send("ready")
        while (command := conn.recv()) != "stop":
            arm, start_at, seconds = command
            call = arms.ours if arm == "ours" else arms.original
            while time.time() < start_at:
                time.sleep(0.001)
            count, end = 0, start_at + seconds
            while time.time() < end:
                call()
                count += 1
            conn.send(count)


def _explicit(settings: Settings) -> dict[str, Any]:
    """The fields set explicitly: a child keeps its own defaults for the rest."""
    return {name: getattr(settings, name) for name in settings.model_fields_set}


@dataclass
class LoopProcesses:
    """``size`` spawned loop processes and the pipes that drive them."""

    settings: Settings
    size: int
    procs: list[Any] = field(default_factory=list)
    pipes: list[Connection] = field(default_factory=list)

    def start(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        for i in range(self.size):
            parent, child = spawn.Pipe()
            proc = spawn.Process(
                target=loop_process, args=(i, _explicit(self.settings), child), daemon=True
            )
            proc.start()
            self.procs.append(proc)
            self.pipes.append(parent)
        for pipe in self.pipes:
            if not pipe.poll(120) or pipe.recv() != "ready":
                raise RuntimeError("a loop process did not get ready")

    def phase(self, arm: str, n: int, seconds: float) -> float:
        """Run ``arm`` in the first ``n`` processes for ``seconds``; total iterations/s."""
        start_at = time.time() + START_LEAD_S
        for pipe in self.pipes[:n]:
            pipe.send((arm, start_at, seconds))
        return sum(int(pipe.recv()) for pipe in self.pipes[:n]) / seconds

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):  # a child that died has closed its end
                pipe.send("stop")
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()


@contextmanager
def loop_processes(settings: Settings, size: int) -> Iterator[LoopProcesses]:
    procs = LoopProcesses(settings, size)
    try:
        procs.start()
        yield procs
    finally:
        procs.stop()


# --------------------------------------------------------------------------------- running


@dataclass
class Curves:
    ours: dict[int, list[float]] = field(default_factory=dict)
    original: dict[int, list[float]] = field(default_factory=dict)
    drain_s: list[float] = field(default_factory=list)
    stuck: list[dict[str, Any]] = field(default_factory=list)


def _settle(ctx: WorkerContext, out: Curves) -> float:
    """Let the pool flush what an ours phase left dirty; seconds it took.

    If the pool leaves entries dirty for :data:`SETTLE_TIMEOUT_S`, that is a finding, not a
    reason to lose the run: the state is recorded (``extra["stuck"]``) and the rest is
    drained in this process so the next phase starts clean.
    """
    try:
        return wait_for(
            lambda: not dirty_total(ctx),
            "the pool to flush the phase",
            timeout_s=SETTLE_TIMEOUT_S,
            poll_s=0.05,
        )
    except HarnessError:
        out.stuck.append(backlog_diagnostics(ctx))
        print(f"  the pool left entries dirty: {out.stuck[-1]}", flush=True)
        drain(ctx, timeout_s=60)
        return SETTLE_TIMEOUT_S


def _one_rep(procs: LoopProcesses, ctx: WorkerContext, plan: Plan, rep: int, out: Curves) -> None:
    for step, n in enumerate(plan.sizes):
        arms = ("ours", "original") if (rep + step) % 2 == 0 else ("original", "ours")
        for arm in arms:
            rate = procs.phase(arm, n, plan.seconds)
            (out.ours if arm == "ours" else out.original).setdefault(n, []).append(rate)
            if arm == "ours":
                out.drain_s.append(_settle(ctx, out))
        ours, original = out.ours[n][-1], out.original[n][-1]
        print(
            f"  rep {rep + 1}/{plan.reps} N={n}: ours {ours:8,.0f} it/s  original "
            f"{original:7,.0f} it/s  ratio {ours / original:.1f}",
            flush=True,
        )


def _measure(plan: Plan) -> Curves:
    curves = Curves()
    with ExitStack() as stack:
        redis_url = stack.enter_context(private_redis())
        db_url = stack.enter_context(migrated_database())
        create_table(db_url)
        settings = bench_settings(redis_url, db_url)
        ctx = stack.enter_context(worker_context(settings))
        stack.enter_context(worker_pool(settings, WORKERS))
        procs = stack.enter_context(loop_processes(settings, max(plan.sizes)))
        print(f"  {max(plan.sizes)} loop processes ready; {plan.seconds:g} s phases", flush=True)
        for rep in range(plan.reps):
            _one_rep(procs, ctx, plan, rep, curves)
    return curves


def _points(curves: Curves, sizes: Sequence[int]) -> list[dict[str, float]]:
    return [
        {
            "n": n,
            "ours": round(median(curves.ours[n])),
            "original": round(median(curves.original[n])),
            "ratio": round(median(curves.ours[n]) / median(curves.original[n]), 2),
        }
        for n in sizes
    ]


def _result(curves: Curves, plan: Plan) -> Result:
    points = _points(curves, plan.sizes)
    plot = plot_parallel_loops(points, DOCS_DIR / PLOT)
    top = points[-1]
    ratios = [p["ratio"] for p in points]
    n = plan.sizes[-1]
    top_reps = [o / b for o, b in zip(curves.ours[n], curves.original[n], strict=True)]
    extra: dict[str, Any] = {
        "spread": (
            f"N={n}: ratio {min(top_reps):.1f}-{max(top_reps):.1f} over {len(top_reps)} reps; "
            f"median ratio {min(ratios):.1f}-{max(ratios):.1f} across N={plan.sizes[0]}..{n}"
        ),
        "curve": points,
        "ours_reps": {str(n): [round(x) for x in v] for n, v in curves.ours.items()},
        "original_reps": {str(n): [round(x) for x in v] for n, v in curves.original.items()},
        "plot": Path(plot).name,
        "phase_seconds": plan.seconds,
        "reps": plan.reps,
        "sessions_per_process": RUNS * NODES,
        "flush_workers": WORKERS,
        "flush_tail_after_ours_phase_s_median": round(median(curves.drain_s), 2),
        "flush_tail_after_ours_phase_s_max": round(max(curves.drain_s), 2),
        "stuck": curves.stuck,
        "what": (
            "N spawned processes, each with its own 2 runs x 5 nodes, looping the node path "
            "(ours: enter, build_request, from_status, finish; 2 RQ flush workers behind) "
            "or ORM load+save+commit (original) for a fixed time from one start instant; "
            "2 vCPUs shared by everything"
        ),
    }
    return make_result(
        NAME,
        METRIC,
        value=float(top["ours"]),
        baseline=float(top["original"]),
        goal=GOAL,
        unit="it/s",
        extra=extra,
    )


def run(quick: bool) -> Result:
    plan = QUICK if quick else FULL
    return _result(_measure(plan), plan)
