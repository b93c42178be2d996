"""The node loop's client CPU per iteration under several garbage-collector settings.

``.venv/bin/python scripts/gc_settings_ab.py [--blocks 10] [--per-block 800]`` (from the
repository root; a private ``redis-server`` and a fresh database on ``$DATABASE_URL``'s
server, as the benchmarks use). One process runs ``cpu_per_iteration``'s loop (enter,
request, answer, from_status, finish with the realistic agent state) in blocks, the settings
taking turns block by block, and prints each setting's median CPU per iteration
(``time.process_time``) against the interpreter's defaults. The README's "garbage collector"
paragraph quotes it.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_sessions.lifecycle import SessionLifecycle
from bench.agent_state import agent_states
from bench.harness import median, private_redis
from bench.loop_vs_postgres import LoopWorkload, ours_iteration
from bench.stack import bench_settings, migrated_database, worker_context
from workers.drain import drain

DEFAULT = gc.get_threshold()


def _freeze(thresholds: tuple[int, int, int] | None = None) -> Callable[[], None]:
    def apply() -> None:
        gc.freeze()
        if thresholds:
            gc.set_threshold(*thresholds)

    return apply


SETTINGS: dict[str, Callable[[], None]] = {
    "default": lambda: None,
    "freeze": _freeze(),
    "freeze + (10000, 20, 20)": _freeze((10_000, 20, 20)),
    "freeze + (50000, 20, 20)": _freeze((50_000, 20, 20)),
    "disabled": gc.disable,
}


def _reset() -> None:
    gc.enable()
    gc.unfreeze()
    gc.set_threshold(*DEFAULT)
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--per-block", type=int, default=800)
    args = parser.parse_args()
    names = list(SETTINGS)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    with ExitStack() as stack:
        redis_url = stack.enter_context(private_redis())
        db_url = stack.enter_context(migrated_database())
        ctx = stack.enter_context(worker_context(bench_settings(redis_url, db_url)))
        workload = LoopWorkload.build(10, 10, seed=23, states=agent_states("realistic"))
        iteration = ours_iteration(SessionLifecycle(ctx), workload)
        for _ in range(500):
            iteration()
        for block in range(args.blocks):
            for name in names[block % len(names) :] + names[: block % len(names)]:
                drain(ctx)
                _reset()
                SETTINGS[name]()
                start = time.process_time()
                for _ in range(args.per_block):
                    iteration()
                cpu[name].append((time.process_time() - start) / args.per_block * 1e6)
            _reset()
    base = median(cpu["default"])
    for name in names:
        print(f"{name:26} {median(cpu[name]):7.1f} us  {median(cpu[name]) / base:.3f} x default")


if __name__ == "__main__":
    main()
