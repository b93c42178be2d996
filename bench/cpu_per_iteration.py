"""cpu_per_iteration: the CPU one loop iteration costs, ours against raw redis-py.

**ours** is ``loop_vs_postgres``' iteration (:func:`bench.loop_vs_postgres.ours_iteration`):
``SessionLifecycle.enter``, ``build_request`` and its JSON, the backend's answer decoded from
JSON, ``RunOutcome.from_status``, ``finish``, against a private ``redis-server`` and a fresh
database. **raw** is the raw arm of ``hot_path`` and ``loop_vs_postgres``: ``HGETALL`` +
``EVALSHA`` of a two-command save script on copies of ours' session hashes, saving the same
states (:mod:`bench.agent_state`; ``--snapshot realistic`` by default, a new state each
iteration; ``--snapshot small``: the one of before). 100 sessions (10 runs x 10 nodes) in
random order, the arms in alternating blocks.

Per block and arm: **client** = this process's CPU (``time.process_time``), **server** = the
Redis server's (``INFO cpu`` user + system) minus its idle rate (measured first, with nothing
sent) times the block's wall time; **total** = both, each divided by the block's iterations.
value = ours' total, baseline = raw's, ratio = ours / raw (goal <= 2.0); the figures are the
medians over blocks.

A third arm, **ours_gc_tuned**, is ours with the garbage-collector settings the README
recommends to an embedding process (and the workers use): ``gc.freeze()`` then
``gc.set_threshold(50_000, 20, 20)``, set before each of its blocks (uncounted) and undone
before every other block; ``extra.gc_tuned_vs_default`` is its total over ours'.

No worker pool runs during the blocks, so neither figure holds a flush: before each block
this process drains the backlog to Postgres (uncounted), as a flush between a loop's saves
would, so the first save of each session in a block finds it clean and the rest find it
dirty: with 1,500 iterations per block, 1 save in 15 takes the clean path, about what a pool
flushing behind a loop gives (``flush_cpu``'s ``saves_per_row``). What the flush itself
costs is ``flush_cpu``'s figure.

Then ours and raw run again, fewer blocks, with a busy-loop process keeping the vCPUs out of
idle (``extra.cpu_warm_*``; the headline is the plain run). On this VM a vCPU with nothing to
do halts at once, and waking it costs the waker CPU (``perf`` puts it where the socket wakes
its reader, inside ``send``) on every round trip of either arm; warm, that cost leaves both
figures, and ``cpu_warm_ratio`` comes closer to the ratio of the arms' own work.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from bench.agent_state import AgentStates, agent_states
from bench.cpu import (
    CpuBlock,
    RedisProbe,
    commands_per_call,
    idle_cpu_rate,
    median_per_call,
    run_cpu_interleaved,
)
from bench.harness import Result, cpu_warm, make_result, private_redis, ratio
from bench.loop_vs_postgres import LoopWorkload, node_path_costs, ours_iteration, raw_arm
from bench.stack import bench_settings, migrated_database, worker_context
from workers.drain import drain
from workers.pool import WORKER_GC_THRESHOLDS

if TYPE_CHECKING:
    from workers.context import WorkerContext

NAME = "cpu_per_iteration"
METRIC = "CPU per loop iteration (client + Redis server), ours / raw redis-py"
GOAL = "<= 2.0"
RUNS, NODES = 10, 10


@dataclass(frozen=True)
class Plan:
    blocks: int
    per_block: int
    warmup: int
    idle_s: float
    warm_blocks: int  # then ours and raw again with a busy-loop process keeping vCPUs awake


QUICK = Plan(blocks=4, per_block=1500, warmup=300, idle_s=1.0, warm_blocks=2)
FULL = Plan(blocks=16, per_block=1500, warmup=1000, idle_s=3.0, warm_blocks=6)


def _progress(idle_rate: float, blocks: int) -> Callable[[int, Mapping[str, CpuBlock]], None]:
    def report(index: int, block: Mapping[str, CpuBlock]) -> None:
        ours, raw = (block[arm].per_call_us(idle_rate) for arm in ("ours", "raw"))
        print(
            f"  block {index + 1:>2}/{blocks}: ours {ours['client']:6.1f} + {ours['server']:5.1f}"
            f" us  raw {raw['client']:6.1f} + {raw['server']:5.1f} us (client + server)  "
            f"ratio {ours['total'] / raw['total']:.2f}",
            flush=True,
        )

    return report


DEFAULT_GC_THRESHOLDS = gc.get_threshold()
TUNED = "ours_gc_tuned"


def set_gc(tuned: bool) -> None:
    """The README's collector advice (``gc.freeze()`` + the workers' thresholds) or the
    interpreter's own settings."""
    if tuned:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*WORKER_GC_THRESHOLDS)
    else:
        gc.unfreeze()
        gc.set_threshold(*DEFAULT_GC_THRESHOLDS)


def _arms(ctx: WorkerContext, workload: LoopWorkload) -> dict[str, Callable[[], object]]:
    """The arms over ``workload``, its sessions created (by ours) and flushed."""
    from agent_sessions.lifecycle import SessionLifecycle

    ours = ours_iteration(SessionLifecycle(ctx), workload)
    for _ in workload.scopes:
        ours()
    drain(ctx)
    return {"ours": ours, "raw": raw_arm(ctx, workload), TUNED: ours}


def _before_block(ctx: WorkerContext, arm: str) -> None:
    set_gc(tuned=arm == TUNED)
    drain(ctx)


def _measure(plan: Plan, states: AgentStates) -> tuple[dict[str, list[CpuBlock]], dict[str, Any]]:
    workload = LoopWorkload.build(RUNS, NODES, seed=23, states=states)
    with ExitStack() as stack:
        redis_url = stack.enter_context(private_redis())
        db_url = stack.enter_context(migrated_database())
        ctx = stack.enter_context(worker_context(bench_settings(redis_url, db_url)))
        arms = _arms(ctx, workload)
        probe = RedisProbe(stack.enter_context(redis.Redis.from_url(redis_url)))
        idle_rate = idle_cpu_rate(probe, plan.idle_s)
        print(f"  {len(workload.scopes)} sessions, no worker pool; timing…", flush=True)
        blocks = run_cpu_interleaved(
            arms,
            probe,
            blocks=plan.blocks,
            per_block=plan.per_block,
            warmup=plan.warmup,
            before_block=lambda arm: _before_block(ctx, arm),
            on_block=_progress(idle_rate, plan.blocks),
        )
        warm = _cpu_warm_blocks(ctx, arms, probe, plan)
        threads = threading.active_count()
        _before_block(ctx, "ours")
        costs = node_path_costs(ctx, workload)
    facts = {
        **_warm_facts(warm, idle_rate),
        **states.facts(),
        "server_idle_cpu_ms_per_s": round(idle_rate * 1000, 3),
        "client_threads_at_end": threads,
        "node_path_step_us": costs,
    }
    return blocks, facts


def _cpu_warm_blocks(
    ctx: WorkerContext, arms: Mapping[str, Callable[[], object]], probe: RedisProbe, plan: Plan
) -> dict[str, list[CpuBlock]]:
    """Ours and raw again with a busy-loop process keeping the vCPUs out of idle: its CPU is
    neither this process's nor the server's, so the figures stay the arms' own; what leaves
    them is the cost of waking a halted vCPU, which both arms pay per round trip."""
    print("  again with a busy-loop process (CPU-warm):", flush=True)
    with cpu_warm():
        return run_cpu_interleaved(
            {arm: arms[arm] for arm in ("ours", "raw")},
            probe,
            blocks=plan.warm_blocks,
            per_block=plan.per_block,
            warmup=plan.warmup,
            before_block=lambda arm: _before_block(ctx, arm),
        )


def _warm_facts(warm: Mapping[str, list[CpuBlock]], idle_rate: float) -> dict[str, Any]:
    ours, raw = (median_per_call(warm[arm], idle_rate) for arm in ("ours", "raw"))
    return {
        "cpu_warm_ours_us": ours,
        "cpu_warm_raw_us": raw,
        "cpu_warm_ratio": round(ratio(ours["total"], raw["total"]), 3),
        "cpu_warm_block_ratios": _block_ratios(warm, idle_rate),
    }


def _block_ratios(blocks: Mapping[str, list[CpuBlock]], idle_rate: float) -> list[float]:
    """Per block, ours' total CPU per iteration over raw's."""
    pairs = zip(blocks["ours"], blocks["raw"], strict=True)
    return [
        round(a.per_call_us(idle_rate)["total"] / b.per_call_us(idle_rate)["total"], 3)
        for a, b in pairs
    ]


def _also(name: str, ours: float, raw: float, how: str) -> dict[str, Any]:
    return {
        "metric": f"{name} CPU per iteration, ours vs raw",
        "value": ours,
        "baseline": raw,
        "unit": "us",
        "note": how,
    }


def _result(blocks: Mapping[str, list[CpuBlock]], plan: Plan, facts: dict[str, Any]) -> Result:
    rate = facts["server_idle_cpu_ms_per_s"] / 1000
    ours, raw = median_per_call(blocks["ours"], rate), median_per_call(blocks["raw"], rate)
    tuned = median_per_call(blocks[TUNED], rate)
    ratios = _block_ratios(blocks, rate)
    extra: dict[str, Any] = {
        "spread": f"block ratios {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} blocks",
        "ours_us": ours,
        "raw_us": raw,
        "client_ratio": round(ratio(ours["client"], raw["client"]), 3),
        "server_ratio": round(ratio(ours["server"], raw["server"]), 3),
        "block_ratios": ratios,
        "ours_gc_tuned_us": tuned,
        "gc_tuned_vs_default": round(ratio(tuned["total"], ours["total"]), 3),
        "server_us_by_command": {arm: commands_per_call(blocks[arm]) for arm in blocks},
        "also": [
            _also("client", ours["client"], raw["client"], "time.process_time"),
            _also("Redis server", ours["server"], raw["server"], "INFO cpu, idle rate out"),
            {
                "metric": "ours with gc.freeze() + thresholds (50000, 20, 20) vs ours' defaults",
                "value": tuned["total"],
                "baseline": ours["total"],
                "unit": "us",
                "note": "README: the embedding process's garbage collector",
            },
            {
                "metric": "CPU-warm (a busy loop keeps the vCPUs awake): ours vs raw",
                "value": facts["cpu_warm_ours_us"]["total"],
                "baseline": facts["cpu_warm_raw_us"]["total"],
                "unit": "us",
                "note": "the vCPUs never halt, so no round trip pays for waking one",
            },
        ],
        "blocks": plan.blocks,
        "per_block": plan.per_block,
        "sessions": RUNS * NODES,
        "clean_path_saves": f"1 in {plan.per_block // (RUNS * NODES)}",
        "what": (
            "CPU per iteration: client = this process (time.process_time), server = private "
            "redis-server (INFO cpu user+sys, minus its idle rate x wall time); ours = "
            "loop_vs_postgres' node path (enter, build_request + JSON, answer JSON decoded, "
            "from_status, finish), raw = redis-py HGETALL + EVALSHA of a two-command script "
            "saving the same states; no worker pool, the backlog drained (uncounted) before "
            "each block"
        ),
        **facts,
    }
    return make_result(
        NAME, METRIC, value=ours["total"], baseline=raw["total"], goal=GOAL, unit="us", extra=extra
    )


def run(quick: bool, snapshot: str | None = None) -> Result:
    plan = QUICK if quick else FULL
    blocks, facts = _measure(plan, agent_states(snapshot))
    return _result(blocks, plan, facts)
