"""fault_recovery: what four faults of a running ``agent-sessions worker`` pool cost.

``python -m bench fault_recovery [--fault worker|trigger|cleanup|group-term] [--quick]``;
without ``--fault`` (what ``python -m bench all`` runs) all four, in that order.

Each case gets its own private Redis, scratch database and real pool (``agent-sessions worker
-n 2``: two RQ workers, the flush trigger and RQ's scheduler under the pool's supervisor),
with the default ``flush_delay_ms`` (1000) and ``flush_lock_ttl_s`` (1) and 16 shards. Where
there is load, a thread of this process saves ~8 KB snapshots round-robin over 200 sessions at
400 saves/s, timing every save with the version it returned, and a row trigger logs every
Postgres write of a session (version, ``flushed_at``). A save *lands* at the first write of
its session at a version at least its own. Once the pool has flushed the rest, a save that
never landed is *lost*: every case must lose none.

- ``worker``: SIGKILL the worker that holds a shard's flush lock (so: one mid-flush) 10
  times, 0.8 s apart (``--quick``: 3). Measured: the longest wait of a save after the last
  kill, ``landed - max(saved, killed)``; ratio = that / ``flush_delay``; goal <= 3. The
  supervisor's ``restarts_worker`` must equal the kills and the pool must still run (its
  crash-loop limit, 5 ends of one process within 60 s, does not count SIGKILLs).
- ``trigger``: SIGKILL the flush trigger 3 times, 5 s apart (``--quick``: 2, 4 s apart: each
  recovery is seen on its own, and the kills stay under the crash-loop limit even were
  SIGKILLs counted), under the same load; after each kill, wait for the restarted trigger's
  first pass. Measured per kill: the longest wait after it of the saves made before the next
  kill (for the last kill, all of them); the case's value is the longest over the kills, so
  no kill's disruption hides behind a later one. ratio = that / ``flush_delay``; goal <= 3.
  The supervisor's ``restarts_flush_trigger`` must equal the kills.
- ``cleanup``: ``reconcile_grace_s`` 2, ``reconcile_interval_s`` 3, ``cleanup_wait_s`` 5 (small,
  so the case is short) and an in-process fake agent backend whose cleanup runs of the case's
  workflow run take 3 s. Four Agent-node runs (``SessionLifecycle``: enter, build_request,
  ``POST /runs``, wait, finish) leave sessions with layer specs, so each cleanup is a backend
  run; ``workflow_ended``; once both workers wait on a cleanup run, SIGKILL the pool's whole
  process group and start a new pool. Measured: from the kill until every session is
  ``cleaned`` in Redis and in Postgres; ratio = that / (grace + 2 x interval + cleanup_wait =
  13 s: the README's bound for a cleanup killed mid-flight, before "plus the cleanup itself");
  goal <= 1. The backend must have seen exactly one cleanup run per session, succeeded (the
  killed attempt's run was asked again, not duplicated). Full run: 2 repetitions, the worse
  one counts.
- ``group-term``: a busy pool (the load; one worker in a cleanup that waits on a 6 s backend
  run, the other flushing): SIGTERM to its whole process group at a moment a flush lock is
  held. Measured: until every process of the group is gone (the leader reaped while polling
  ``killpg(pgid, 0)``); ratio = that / 10 s (the README's stop bound); goal <= 1. Then a new
  pool: the load goes on for a few seconds, stops, the pool flushes the rest and every save
  must have landed; the cleanup must have been handed back (``cleanups_handed_back`` = 1) and
  finished by the new pool with the same, single backend run.

The result (one for the cases run): each case's *share* = its ratio / its goal, so a share
<= 1 meets that case's goal. value = the worst share, baseline = 1 (a goal exactly met), so
``ratio`` = value: the worst case's ratio against its own goal; goal <= 1. ``extra["met"]``
is true only if every case met its goal, lost no save and showed no problem (a duplicate
cleanup run, a restart count off, a pool that exited or did not stop); each case's numbers
are in ``extra[<fault>]``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent_sessions.lifecycle import SessionLifecycle
from bench.faults import (
    WORKERS,
    Stack,
    case_stack,
    cleaned,
    cleanup_runs,
    first_held,
    flusher_pid,
    live_trigger,
    loading,
    longest_wait_per_kill,
    lost_versions,
    seed_backend_sessions,
    signal_group,
    waits_after,
)
from bench.harness import HarnessError, Result, make_result, median
from bench.loop_vs_postgres import build_scopes
from bench.stack import WorkerPool, wait_for
from cache.records import SessionKey
from workers.context import WorkerContext

NAME = "fault_recovery"
FAULTS = ("worker", "trigger", "cleanup", "group-term")
STOP_BOUND_S = 10.0
"""Every process of the pool is gone within this long of a stop signal (README)."""
CLEANUP_SETTINGS = {"reconcile_grace_s": 2.0, "reconcile_interval_s": 3.0, "cleanup_wait_s": 5.0}
CLEANUP_RUN_MS = 3000
TERM_CLEANUP_RUN_MS = 6000
WHAT = (
    "four faults of a real agent-sessions worker -n 2 pool, each case on its own Redis and "
    "database; a case's share = its ratio / its goal, value = the worst share. worker: 10 "
    "SIGKILLs of flushing workers 0.8 s apart, trigger: 3 SIGKILLs of the flush trigger 5 s "
    "apart, both under 400 saves/s: the longest wait of a save after the last kill (trigger: "
    "after each kill), flushed_at of its first Postgres write - max(saved, killed), / "
    "flush_delay (1 s), goal <= 3. cleanup: 4 sessions with layer specs (node runs against the "
    "fake backend, cleanup runs of 3 s), run ended, SIGKILL of the pool's group while 2 "
    "cleanups wait on the backend, a new pool: until every session is cleaned in Redis and "
    "Postgres / (reconcile_grace_s 2 + 2 x reconcile_interval_s 3 + cleanup_wait_s 5: small "
    "settings for a short case), goal <= 1, and exactly one backend run per session. "
    "group-term: SIGTERM to the group of the pool busy flushing and in a cleanup: until every "
    "process is gone / 10 s, goal <= 1; then a new pool drains and finishes the handed-back "
    "cleanup. Every case: every acknowledged save must reach Postgres (0 lost)"
)


@dataclass(frozen=True)
class Plan:
    worker_kills: int
    trigger_kills: int
    trigger_every_s: float
    tail_s: float  # the load goes on this long after the last kill
    cleanup_reps: int
    term_tail_s: float  # the load goes on this long after the next pool started
    worker_every_s: float = 0.8
    cleanup_sessions: int = 4


QUICK = Plan(
    worker_kills=3,
    trigger_kills=2,
    trigger_every_s=4.0,
    tail_s=4.0,
    cleanup_reps=1,
    term_tail_s=3,
)
FULL = Plan(
    worker_kills=10,
    trigger_kills=3,
    trigger_every_s=5.0,
    tail_s=10.0,
    cleanup_reps=2,
    term_tail_s=6,
)


@dataclass(frozen=True)
class Case:
    """One fault case: what it measured against which bound, and what it checked."""

    fault: str
    measured: str
    measured_s: float
    bound: str
    bound_s: float
    goal: float
    """On ``measured_s / bound_s``."""
    saves: int
    """Acknowledged saves checked against Postgres."""
    lost: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.measured_s / self.bound_s

    @property
    def share(self) -> float:
        """The ratio as a fraction of its goal: <= 1 meets it."""
        return self.ratio / self.goal

    @property
    def met(self) -> bool:
        return self.share <= 1 and not self.lost and not self.problems

    def line(self) -> str:
        verdict = "met" if self.met else "MISSED"
        text = (
            f"{self.fault}: {self.measured} {self.measured_s:.2f} s; bound ({self.bound}) "
            f"{self.bound_s:g} s; ratio {self.ratio:.2f} (goal <= {self.goal:g}: {verdict}); "
            f"{self.saves} acknowledged saves checked, {len(self.lost)} lost"
        )
        return "; ".join([text, *self.problems])

    def also(self) -> dict[str, Any]:
        """The case as a secondary row of the report (``extra["also"]``), in seconds."""
        problems = "".join(f"; {problem}" for problem in self.problems)
        return {
            "metric": f"{self.fault}: {self.measured}",
            "value": round(self.measured_s, 3),
            "unit": "s",
            "baseline": self.bound_s,
            "goal": f"<= {self.goal * self.bound_s:g}",
            "met": self.met,
            "note": f"baseline = {self.bound}; {self.saves} saves checked, "
            f"{len(self.lost)} lost{problems}",
        }

    def summary(self) -> dict[str, Any]:
        return {
            "measured": self.measured,
            "value_s": round(self.measured_s, 3),
            "bound": self.bound,
            "bound_s": self.bound_s,
            "ratio": round(self.ratio, 3),
            "goal": f"<= {self.goal:g}",
            "share_of_goal": round(self.share, 3),
            "met": self.met,
            "saves_checked": self.saves,
            "saves_lost": len(self.lost),
            **({"lost_examples": self.lost[:5]} if self.lost else {}),
            **({"problems": self.problems} if self.problems else {}),
            **self.facts,
        }


def _restarts(ctx: WorkerContext, counter: str, expected: int) -> tuple[int, list[str]]:
    seen = ctx.cache.counters().get(counter, 0)
    return seen, [] if seen == expected else [f"{counter} = {seen}, expected {expected}"]


def _still_running(pool: WorkerPool) -> list[str]:
    if pool.alive():
        return []
    return [f"the pool exited with status {pool.proc.returncode}: {pool.tail(3)!r}"]


# --------------------------------------------------------------------------------- cases


def worker_case(plan: Plan) -> Case:
    """SIGKILL flushing workers under load."""
    with case_stack() as st, loading(st, st.pool()) as (ctx, pool, loader):
        killed: list[int] = []
        kills = []
        for n in range(plan.worker_kills):
            killed.append(flusher_pid(ctx, pool, lambda pid: pid not in killed))
            os.kill(killed[-1], signal.SIGKILL)
            kills.append(time.time())
            print(f"  worker: kill {n + 1}/{plan.worker_kills} (pid {killed[-1]})", flush=True)
            time.sleep(plan.worker_every_s)
        time.sleep(plan.tail_s)
        settle, landed = st.settled(loader)
        waits = waits_after(landed.pairs, kills[-1])
        restarts, problems = _restarts(ctx, "restarts_worker", len(kills))
        return Case(
            "worker",
            "longest wait after the last kill",
            max(waits),
            "flush_delay",
            st.delay_s,
            3.0,
            landed.checked,
            landed.lost,
            problems + _still_running(pool),
            {
                "median_wait_s": round(median(waits), 3),
                "saves_after_last_kill": len(waits),
                "kills": len(kills),
                "restarts_worker": restarts,
                "kill_every_s": plan.worker_every_s,
                "load_after_last_kill_s": plan.tail_s,
                "settle_after_load_s": round(settle, 2),
                "flush_lock_ttl_s": ctx.settings.flush_lock_ttl_s,
            },
        )


def trigger_case(plan: Plan) -> Case:
    """SIGKILL the flush trigger under load, spaced below the crash-loop limit."""
    with case_stack() as st, loading(st, st.pool()) as (ctx, pool, loader):
        pid, kills, back_s = live_trigger(ctx, pool), [], []
        for n in range(plan.trigger_kills):
            os.kill(pid, signal.SIGKILL)
            kills.append(at := time.time())
            killed, pid = pid, live_trigger(ctx, pool, other_than=pid)
            back_s.append(time.time() - at)
            print(
                f"  trigger: kill {n + 1}/{plan.trigger_kills} (pid {killed}); its successor "
                f"(pid {pid}) passed {back_s[-1]:.2f} s later",
                flush=True,
            )
            if n + 1 < plan.trigger_kills:
                time.sleep(max(0.0, at + plan.trigger_every_s - time.time()))
        time.sleep(plan.tail_s)
        settle, landed = st.settled(loader)
        per_kill = longest_wait_per_kill(landed.pairs, kills)
        after_last = waits_after(landed.pairs, kills[-1])
        restarts, problems = _restarts(ctx, "restarts_flush_trigger", len(kills))
        return Case(
            "trigger",
            "longest wait after a kill",
            max(per_kill),
            "flush_delay",
            st.delay_s,
            3.0,
            landed.checked,
            landed.lost,
            problems + _still_running(pool),
            {
                "longest_wait_after_each_kill_s": [round(w, 3) for w in per_kill],
                "longest_wait_after_last_kill_s": round(max(after_last), 3),
                "median_wait_after_last_kill_s": round(median(after_last), 3),
                "saves_after_last_kill": len(after_last),
                "kills": len(kills),
                "restarts_flush_trigger": restarts,
                "successor_passed_after_s": [round(s, 2) for s in back_s],
                "kill_every_s": plan.trigger_every_s,
                "load_after_last_kill_s": plan.tail_s,
                "settle_after_load_s": round(settle, 2),
            },
        )


def cleanup_case(plan: Plan) -> Case:
    """SIGKILL the whole pool while cleanups wait on the backend; a new pool finishes them."""
    with case_stack(backend=True, **CLEANUP_SETTINGS) as st:
        settings = st.ctx.settings
        grace, interval = settings.reconcile_grace_s, settings.reconcile_interval_s
        wait = settings.cleanup_wait_s
        bound_s = grace + 2 * interval + wait
        bound = f"grace {grace:g} + 2 x interval {interval:g} + cleanup_wait {wait:g}"
        print(
            f"  cleanup: small settings for a short case: reconcile_grace_s {grace:g}, "
            f"reconcile_interval_s {interval:g}, cleanup_wait_s {wait:g}; the backend's "
            f"cleanup runs take {CLEANUP_RUN_MS / 1000:g} s",
            flush=True,
        )
        pool, reps = st.pool(), []
        for rep in range(plan.cleanup_reps):
            pool, facts = _kill_mid_cleanup(st, pool, plan.cleanup_sessions, seed=900 + rep)
            reps.append(facts)
            print(
                f"  cleanup: rep {rep + 1}/{plan.cleanup_reps}: every session cleaned "
                f"{facts['cleaned_s']:.2f} s after the kill (Redis: {facts['redis_s']:.2f} s)",
                flush=True,
            )
        worst = max(reps, key=lambda facts: facts["cleaned_s"])
        return Case(
            "cleanup",
            "from the kill until all cleaned (Redis and Postgres)",
            worst["cleaned_s"],
            bound,
            bound_s,
            1.0,
            sum(len(facts["saved"]) for facts in reps),
            [lost for facts in reps for lost in facts["lost"]],
            [problem for facts in reps for problem in facts["problems"]],
            {
                "reps": [_shown(facts) for facts in reps],
                "sessions_per_rep": plan.cleanup_sessions,
                "settings": {**CLEANUP_SETTINGS, "workers": WORKERS},
                "backend_cleanup_run_ms": CLEANUP_RUN_MS,
                "lease_ttl_s": min(max(settings.reconcile_interval_s / 2, 1), 10),
                "counters": _cleanup_counters(st.ctx),
            },
        )


def _kill_mid_cleanup(
    st: Stack, pool: WorkerPool, sessions: int, seed: int
) -> tuple[WorkerPool, dict[str, Any]]:
    """One repetition; the new pool and what it saw."""
    ctx, fake = st.ctx, st.backend
    saved = seed_backend_sessions(ctx, fake.url, build_scopes(runs=1, nodes=sessions, seed=seed))
    keys = list(saved)
    tenant, run = keys[0].tenant_id, keys[0].owner_id
    fake.set_behaviour(f"slow:{CLEANUP_RUN_MS}", match_idempotency_prefix=f"{run}:")
    ended = time.time()
    report = SessionLifecycle(ctx).workflow_ended(tenant, run, "succeeded")
    if report.cleanups_enqueued != len(keys):
        raise HarnessError(f"workflow_ended queued {report}")
    busy = min(WORKERS, len(keys))
    wait_for(
        lambda: sum("running" in cleanup_runs(fake, key) for key in keys) >= busy,
        f"{busy} cleanups to wait on their backend run",
        timeout_s=30,
        poll_s=0.01,
    )
    in_flight = [key for key in keys if "running" in cleanup_runs(fake, key)]
    killed = time.time()
    pool.kill()  # SIGKILL to the whole group: nothing gets to clean up after itself
    pool = st.pool(ready=False)
    seen = first_held(
        {
            "the killed ones cleaned in Redis": lambda: cleaned(ctx, in_flight)[0],
            "all cleaned in Redis": lambda: cleaned(ctx, keys)[0],
            "all cleaned in Postgres": lambda: cleaned(ctx, keys)[1],
        },
        since=killed,
        timeout_s=60 + ctx.settings.reconcile_grace_s + 2 * ctx.settings.reconcile_interval_s,
    )
    killed_s = seen["the killed ones cleaned in Redis"]
    redis_s, cleaned_s = seen["all cleaned in Redis"], seen["all cleaned in Postgres"]
    runs = {key.node_id: cleanup_runs(fake, key) for key in keys}
    problems = [
        f"{node}: cleanup runs {statuses}, expected one that succeeded"
        for node, statuses in runs.items()
        if statuses != ["succeeded"]
    ]
    return pool, {
        "cleaned_s": round(cleaned_s, 3),
        "redis_s": round(redis_s, 3),
        "killed_after_run_end_s": round(killed - ended, 3),
        "cleaned_after_run_end_s": round(cleaned_s + killed - ended, 3),
        "running_at_kill": len(in_flight),
        "killed_ones_cleaned_s": round(killed_s, 3),
        "cleanup_jobs_done_by_the_next_pool": len(pool.job_seconds("cleanup_job")),
        "backend_runs_per_session": sorted({len(statuses) for statuses in runs.values()}),
        "saved": saved,
        "lost": lost_versions(ctx, saved),
        "problems": problems,
    }


def _shown(facts: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in facts.items() if k not in ("saved", "lost", "problems")}


def _cleanup_counters(ctx: WorkerContext) -> dict[str, int]:
    return {k: v for k, v in sorted(ctx.cache.counters().items()) if "clean" in k}


def group_term_case(plan: Plan) -> Case:
    """SIGTERM to the busy pool's whole process group; then a new pool drains."""
    with case_stack(backend=True) as st:
        ctx, fake = st.ctx, st.backend
        saved = seed_backend_sessions(ctx, fake.url, build_scopes(runs=1, nodes=1, seed=1300))
        (key,) = saved
        with loading(st, st.pool()) as (_, pool, loader):
            stopped = _term_busy_pool(st, pool, key)
            restarted = time.monotonic()
            ready_s = st.pool(ready=False).wait_ready()
            done_s = ready_s + wait_for(
                lambda: cleaned(ctx, [key])[0], "the handed-back cleanup to finish", timeout_s=60
            )
            time.sleep(max(0.0, restarted + plan.term_tail_s - time.monotonic()))
            settle, landed = st.settled(loader)
        wait_for(lambda: cleaned(ctx, [key])[1], "the cleaned session in Postgres", timeout_s=30)
        runs = cleanup_runs(fake, key)
        problems = stopped.problems
        if runs != ["succeeded"]:
            problems.append(f"cleanup runs {runs}, expected one that succeeded")
        waits = waits_after(landed.pairs, stopped.at)
        return Case(
            "group-term",
            "until every process of the group is gone",
            stopped.seconds,
            "stop bound",
            STOP_BOUND_S,
            1.0,
            landed.checked + len(saved),
            landed.lost + lost_versions(ctx, saved),
            problems,
            {
                "exit_status": stopped.status,
                "cleanups_handed_back": stopped.handed_back,
                "cleanup_runs": runs,
                "handed_back_cleanup_cleaned_after_restart_s": round(done_s, 2),
                "next_pool_ready_s": round(ready_s, 2),
                "longest_wait_of_a_save_across_the_restart_s": round(max(waits), 3),
                "load_after_restart_s": plan.term_tail_s,
                "settle_after_load_s": round(settle, 2),
                "backend_cleanup_run_ms": TERM_CLEANUP_RUN_MS,
            },
        )


@dataclass(frozen=True)
class Stopped:
    at: float
    seconds: float
    status: int | None
    handed_back: int
    problems: list[str]


def _term_busy_pool(st: Stack, pool: WorkerPool, key: SessionKey) -> Stopped:
    """End the run of ``key`` (its cleanup waits on a slow backend run), then SIGTERM the
    pool's group while a flush runs; how the stop went."""
    ctx, fake = st.ctx, st.backend
    fake.set_behaviour(
        f"slow:{TERM_CLEANUP_RUN_MS}", match_idempotency_prefix=f"{key.workflow_run_id}:"
    )
    SessionLifecycle(ctx).workflow_ended(key.tenant_id, key.owner_id, "succeeded")
    wait_for(
        lambda: cleanup_runs(fake, key) == ["running"],
        "the cleanup to wait on its backend run",
        timeout_s=30,
        poll_s=0.01,
    )
    flusher_pid(ctx, pool)  # a flush is in flight
    at = time.time()
    seconds = signal_group(pool, signal.SIGTERM, timeout_s=3 * STOP_BOUND_S)
    problems = [] if seconds is not None else [f"still running {3 * STOP_BOUND_S:g} s later"]
    if seconds is None:
        pool.kill()
    print(f"  group-term: every process gone {seconds or 0:.2f} s after SIGTERM", flush=True)
    status = pool.proc.returncode
    if status != 0:
        problems.append(f"the pool exited with status {status}")
    handed_back, more = _restarts(ctx, "cleanups_handed_back", 1)
    seconds = 3 * STOP_BOUND_S if seconds is None else seconds
    return Stopped(at, seconds, status, handed_back, problems + more)


CASES: dict[str, Callable[[Plan], Case]] = {
    "worker": worker_case,
    "trigger": trigger_case,
    "cleanup": cleanup_case,
    "group-term": group_term_case,
}


# --------------------------------------------------------------------------------- result


def combine(cases: Sequence[Case]) -> Result:
    """One result for the cases run: value = the worst share of its goal (see the module)."""
    if not cases:
        raise HarnessError("no fault case ran")
    worst = max(cases, key=lambda case: case.share)
    checked = sum(case.saves for case in cases)
    lost = sum(len(case.lost) for case in cases)
    shares = ", ".join(f"{case.fault} {case.share:.2f}" for case in cases)
    extra: dict[str, Any] = {
        "spread": f"share of goal: {shares}; {lost} of {checked} acknowledged saves lost",
        "what": WHAT,
        "also": [case.also() for case in cases],
        "worst_case": worst.fault,
        "saves_checked": checked,
        "saves_lost": lost,
        **{case.fault: case.summary() for case in cases},
        "met": all(case.met for case in cases),
    }
    return make_result(
        NAME,
        f"worst fault case ({', '.join(case.fault for case in cases)}): time / its goal's bound",
        value=round(worst.share, 3),
        baseline=1.0,
        goal="<= 1",
        unit="x goal",
        extra=extra,
    )


def run(quick: bool, fault: str | None = None) -> Result:
    if fault is not None and fault not in CASES:
        raise HarnessError(f"--fault must be one of {', '.join(FAULTS)}, got {fault!r}")
    plan = QUICK if quick else FULL
    cases = []
    for name in FAULTS if fault is None else (fault,):
        print(f"  -- {name}", flush=True)
        cases.append(CASES[name](plan))
        print(f"  {cases[-1].line()}", flush=True)
    return combine(cases)
