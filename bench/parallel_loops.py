"""parallel_loops: loop throughput with N processes, ours against raw redis-py and the original.

N loop processes (N = 1, 2, 4, 8; spawned once, each with its own 2 workflow runs x 5 Agent
nodes) run the ``loop_vs_postgres`` iteration flat out for a fixed time, all starting at the
same instant: **ours** (the real node path of ``loop_vs_postgres``: ``enter``,
``build_request`` and its JSON, the backend's answer decoded, ``RunOutcome.from_status``,
``finish``, with a 2-process ``agent-sessions worker`` pool flushing behind; the backend's
own time left out), **raw** (``HGETALL`` + ``EVALSHA`` of a two-command save script on copies
of ours' session hashes: the floor of any Redis-backed loop) or the **original**
(:mod:`bench.pg_original`, ORM load + read-then-write save with a commit), every arm saving
the same states (:mod:`bench.agent_state`; ``--snapshot realistic`` by default). Total
iterations/s per arm and N; the arms take turns at every N and repetition, and after an
ours phase the pool is let finish its flushes before the next phase starts, so no arm runs
in ours' shadow.

value = ours at the largest N, baseline = raw at that N, ratio = ours / raw (goal >= 0.5);
``extra`` has the original at that N and ours / original (``ratio_vs_original``, goal >= 10,
the throughput mirror of ``loop_vs_postgres``' time ratio), and the whole curves, drawn in
``docs/parallel_loops.png`` by a run of the default snapshot.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.agent_state import AgentStates, agent_states
from bench.harness import (
    HarnessError,
    Result,
    goal_met,
    make_result,
    median,
    private_redis,
)
from bench.loop_vs_postgres import LoopWorkload, loop_arms
from bench.pg_original import create_table
from bench.plot import plot_parallel_loops, plot_path
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
METRIC = "loop iterations/s at 8 processes, ours / raw redis-py"
GOAL = ">= 0.5"
GOAL_VS_ORIGINAL = ">= 10"
ARMS = ("ours", "raw", "original")
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
    quick: bool


QUICK = Plan(sizes=(1, 2, 4, 8), seconds=1.0, reps=1, quick=True)
FULL = Plan(sizes=(1, 2, 4, 8), seconds=2.5, reps=3, quick=False)


# --------------------------------------------------------------------------------- children


def loop_process(index: int, settings: dict[str, Any], snapshot: str, conn: Connection) -> None:
    """One loop process: set the arms up, then run phases on command until told to stop."""
    states = agent_states(snapshot)
    workload = LoopWorkload.build(RUNS, NODES, seed=1000 + index, states=states)
    with loop_arms(Settings(**settings), workload) as arms:
        calls = {"ours": arms.ours, "raw": arms.raw, "original": arms.original}
        conn.send("ready")
        while (command := conn.recv()) != "stop":
            arm, start_at, seconds = command
            call = calls[arm]
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
    snapshot: str
    procs: list[Any] = field(default_factory=list)
    pipes: list[Connection] = field(default_factory=list)

    def start(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        for i in range(self.size):
            parent, child = spawn.Pipe()
            proc = spawn.Process(
                target=loop_process,
                args=(i, _explicit(self.settings), self.snapshot, child),
                daemon=True,
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
def loop_processes(settings: Settings, size: int, snapshot: str) -> Iterator[LoopProcesses]:
    procs = LoopProcesses(settings, size, snapshot)
    try:
        procs.start()
        yield procs
    finally:
        procs.stop()


# --------------------------------------------------------------------------------- running


@dataclass
class Curves:
    """Iterations/s per arm, N and repetition; the pool's flush tails; stuck backlogs."""

    rates: dict[str, dict[int, list[float]]] = field(
        default_factory=lambda: {arm: {} for arm in ARMS}
    )
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
        turn = (rep + step) % len(ARMS)
        for arm in ARMS[turn:] + ARMS[:turn]:
            out.rates[arm].setdefault(n, []).append(procs.phase(arm, n, plan.seconds))
            if arm == "ours":
                out.drain_s.append(_settle(ctx, out))
        ours, raw, original = (out.rates[arm][n][-1] for arm in ARMS)
        print(
            f"  rep {rep + 1}/{plan.reps} N={n}: ours {ours:8,.0f} it/s  raw {raw:8,.0f} it/s  "
            f"original {original:7,.0f} it/s  ours/raw {ours / raw:.2f}  "
            f"ours/original {ours / original:.1f}",
            flush=True,
        )


def _measure(plan: Plan, states: AgentStates) -> Curves:
    curves = Curves()
    with ExitStack() as stack:
        redis_url = stack.enter_context(private_redis())
        db_url = stack.enter_context(migrated_database())
        create_table(db_url)
        settings = bench_settings(redis_url, db_url)
        ctx = stack.enter_context(worker_context(settings))
        stack.enter_context(worker_pool(settings, WORKERS))
        procs = stack.enter_context(loop_processes(settings, max(plan.sizes), states.kind))
        print(f"  {max(plan.sizes)} loop processes ready; {plan.seconds:g} s phases", flush=True)
        for rep in range(plan.reps):
            _one_rep(procs, ctx, plan, rep, curves)
    return curves


def _points(curves: Curves, sizes: Sequence[int]) -> list[dict[str, float]]:
    """Per N: each arm's median iterations/s, ours / raw and ours / original."""
    points = []
    for n in sizes:
        ours, raw, original = (median(curves.rates[arm][n]) for arm in ARMS)
        points.append(
            {
                "n": n,
                "ours": round(ours),
                "raw": round(raw),
                "original": round(original),
                "ratio": round(ours / raw, 3),
                "ratio_vs_original": round(ours / original, 2),
            }
        )
    return points


def _spread(curves: Curves, points: Sequence[Mapping[str, float]], sizes: Sequence[int]) -> str:
    n = sizes[-1]
    top = [o / r for o, r in zip(curves.rates["ours"][n], curves.rates["raw"][n], strict=True)]
    ratios = [p["ratio"] for p in points]
    return (
        f"N={n}: ours/raw {min(top):.2f}-{max(top):.2f} over {len(top)} reps; median "
        f"ours/raw {min(ratios):.2f}-{max(ratios):.2f} across N={sizes[0]}..{n}"
    )


def _vs_original(top: Mapping[str, float]) -> dict[str, Any]:
    return {
        "original_at_top": top["original"],
        "ratio_vs_original": top["ratio_vs_original"],
        "goal_vs_original": GOAL_VS_ORIGINAL,
        "met_vs_original": goal_met(GOAL_VS_ORIGINAL, top["ratio_vs_original"]),
    }


def _result(curves: Curves, plan: Plan, states: AgentStates) -> Result:
    points = _points(curves, plan.sizes)
    top = points[-1]
    extra: dict[str, Any] = {
        "spread": _spread(curves, points, plan.sizes),
        **_vs_original(top),
        "curve": points,
        **{f"{arm}_reps": _reps(curves.rates[arm]) for arm in ARMS},
        "phase_seconds": plan.seconds,
        "reps": plan.reps,
        "sessions_per_process": RUNS * NODES,
        "flush_workers": WORKERS,
        "flush_tail_after_ours_phase_s_median": round(median(curves.drain_s), 2),
        "flush_tail_after_ours_phase_s_max": round(max(curves.drain_s), 2),
        "stuck": curves.stuck,
        "what": (
            "N spawned processes, each with its own 2 runs x 5 nodes, looping the node path "
            "(ours: enter, build_request, from_status, finish; 2 RQ flush workers behind), "
            "redis-py HGETALL + EVALSHA (raw) or ORM load+save+commit (original) for a fixed "
            "time from one start instant; 2 vCPUs shared by everything"
        ),
        **states.facts(),
    }
    if states.variant is None:
        _plot(curves, points, plan, extra)
    return make_result(
        NAME,
        METRIC,
        value=float(top["ours"]),
        baseline=float(top["raw"]),
        goal=GOAL,
        unit="it/s",
        extra=extra,
    )


def _plot(
    curves: Curves, points: list[dict[str, float]], plan: Plan, extra: dict[str, Any]
) -> None:
    """A full run redraws docs/parallel_loops.png (``extra["plot"]``); a quick one draws
    into bench/results/ (``extra["plot_preview"]``) and leaves docs/ alone."""
    goal = float(GOAL.removeprefix(">=").strip())
    path = plot_parallel_loops(points, curves.rates, goal, plot_path(PLOT, plan.quick))
    if plan.quick:
        extra["plot_preview"] = f"bench/results/{path.name}"
    else:
        extra["plot"] = path.name


def _reps(rates: Mapping[int, Sequence[float]]) -> dict[str, list[int]]:
    return {str(n): [round(x) for x in values] for n, values in rates.items()}


def run(quick: bool, snapshot: str | None = None) -> Result:
    plan = QUICK if quick else FULL
    states = agent_states(snapshot)
    return _result(_measure(plan, states), plan, states)
