"""scale: does a loop iteration slow down, and what does a session cost, with 100k sessions?

Two private Redis servers, filled through the save script (pipelined) with the same ~8 KB
snapshot mix: **small** holds 1,000 live sessions, **large** 100,000 (``--quick``: 20,000),
ten Agent nodes per workflow run. The fill is then acknowledged as flushed (``ack_flush``
per shard, as a flush would), so the sessions are in their steady state: clean, with TTLs.
One iteration = ``RedisSessionCache.load`` + ``save`` at the loaded version of a random
session; the two servers are timed in alternating blocks.

- value = speed large/small = per-iteration time small / large (goal >= 0.8: no slowdown
  with size); the per-iteration medians are in ``extra``.
- memory: ``INFO memory`` ``used_memory`` delta over the fill / sessions - the encoded
  snapshot + specs bytes, for the dirty state (right after the saves) and the clean state
  (after the acknowledgement); the secondary goal (< 1 KB) applies to the larger of the two.
  The jemalloc size-class rounding of the ~8 KB snapshot value is part of the overhead
  (Redis accounts allocated sizes); ``extra`` estimates it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from bench.harness import (
    Result,
    goal_met,
    make_result,
    median,
    ns_to_us,
    private_redis,
    ratio,
    run_interleaved,
    summarize,
)
from bench.hot_path import build_keys, build_snapshot, build_specs, build_write
from bench.stack import (
    bulk_save,
)
from cache.client import connect
from cache.records import RunRef, SessionKey, SessionWrite
from cache.settings import Settings
from cache.store import RedisSessionCache

NAME = "scale"
METRIC = "iteration speed with many live sessions, large/small"
GOAL = ">= 0.8"
MEMORY_GOAL = "< 1024"
VARIANTS = 16  # snapshot sizes spread over 6-10 KB, like real histories of varying length
ACK_CHUNK = 500


@dataclass(frozen=True)
class Plan:
    small: int
    large: int
    blocks: int
    per_block: int
    warmup: int


QUICK = Plan(small=1_000, large=20_000, blocks=6, per_block=400, warmup=200)
FULL = Plan(small=1_000, large=100_000, blocks=10, per_block=1500, warmup=500)


def build_writes() -> list[SessionWrite]:
    base = build_write()
    sizes = [6 * 1024 + i * 4 * 1024 // (VARIANTS - 1) for i in range(VARIANTS)]
    return [
        SessionWrite(
            snapshot=build_snapshot(size, seed=31 + i),
            layer_specs=build_specs(),
            app_id=base.app_id,
            workflow_id=base.workflow_id,
            node_execution_id=base.node_execution_id,
            agent_config_snapshot_id=base.agent_config_snapshot_id,
            backend_run_id=base.backend_run_id,
        )
        for i, size in enumerate(sizes)
    ]


@dataclass
class Filled:
    """One server with ``sessions`` live sessions and what they cost in memory."""

    cache: RedisSessionCache
    keys: list[SessionKey]
    payload_bytes: float
    dirty_overhead: float = 0.0
    clean_overhead: float = 0.0
    rounding: float = 0.0
    breakdown: dict[str, Any] = field(default_factory=dict)


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _payload_bytes(cache: RedisSessionCache, writes: Sequence[SessionWrite], n: int) -> float:
    """Mean encoded snapshot + specs bytes over the ``n`` sessions (writes cycle)."""
    sizes = [
        len(cache.codec.encode_snapshot(w.snapshot)) + len(cache.codec.encode_specs(w.layer_specs))
        for w in writes
    ]
    return sum(sizes[i % len(sizes)] for i in range(n)) / n


def _ack_all(cache: RedisSessionCache, keys: Sequence[SessionKey]) -> None:
    """Acknowledge every session at version 1, as a flush of all of them would."""
    by_shard: dict[int, list[tuple[str, int]]] = {}
    for key in keys:
        by_shard.setdefault(cache.keys.shard_of_key(key), []).append((cache.keys.session(key), 1))
    for shard, flushed in by_shard.items():
        for i in range(0, len(flushed), ACK_CHUNK):
            cache.ack_flush(shard, flushed[i : i + ACK_CHUNK])


def fill(cache: RedisSessionCache, count: int, writes: Sequence[SessionWrite]) -> Filled:
    keys = build_keys(count, seed=41)
    client = cast(redis.Redis, cache.client)
    before = _used_memory(client)
    accepted = bulk_save(cache, keys, writes)
    if accepted != count:
        raise RuntimeError(f"the fill saved {accepted} of {count}")
    filled = Filled(cache, keys, _payload_bytes(cache, writes, count))
    filled.dirty_overhead = (_used_memory(client) - before) / count - filled.payload_bytes
    _ack_all(cache, keys)
    filled.clean_overhead = (_used_memory(client) - before) / count - filled.payload_bytes
    filled.rounding = snapshot_rounding(cache, writes)
    filled.breakdown = memory_breakdown(filled)
    return filled


class Iteration:
    """Load + save at the loaded version of a random session, keeping its snapshot size."""

    def __init__(self, filled: Filled, writes: Sequence[SessionWrite], seed: int) -> None:
        self.cache = filled.cache
        self.keys = filled.keys
        self.writes = writes
        order = list(range(len(self.keys)))
        random.Random(seed).shuffle(order)
        self._order = itertools.cycle(order)

    def __call__(self) -> None:
        i = next(self._order)
        key = self.keys[i]
        loaded = self.cache.load(key)
        self.cache.save(key, self.writes[i % len(self.writes)], expected_version=loaded.version)


def _progress(plan: Plan) -> Callable[[int, Mapping[str, list[int]]], None]:
    def report(index: int, block: Mapping[str, list[int]]) -> None:
        small, large = median(block["small"]) / 1000, median(block["large"]) / 1000
        print(
            f"  block {index + 1:>2}/{plan.blocks}: small {small:6.1f} us  large {large:6.1f} us"
            f"  speed large/small {small / large:.2f}",
            flush=True,
        )

    return report


def _open_cache(stack: ExitStack) -> RedisSessionCache:
    url = stack.enter_context(private_redis())
    settings = Settings(redis_url=url)
    client = stack.enter_context(cast(redis.Redis, connect(settings)))
    return RedisSessionCache(client, settings)


def _measure(plan: Plan) -> tuple[dict[str, list[list[int]]], Filled, Filled]:
    writes = build_writes()
    with ExitStack() as stack:
        small = fill(_open_cache(stack), plan.small, writes)
        print(f"  small: {plan.small:,} sessions filled", flush=True)
        large = fill(_open_cache(stack), plan.large, writes)
        print(f"  large: {plan.large:,} sessions filled; timing…", flush=True)
        samples = run_interleaved(
            {"small": Iteration(small, writes, 5), "large": Iteration(large, writes, 5)},
            blocks=plan.blocks,
            per_block=plan.per_block,
            warmup=plan.warmup,
            on_block=_progress(plan),
        )
    return samples, small, large


def jemalloc_class(size: int) -> int:
    """The allocation jemalloc makes for ``size`` bytes: four size classes per doubling."""
    if size <= 16:
        return 8 if size <= 8 else 16
    spacing = 1 << max((size - 1).bit_length() - 3, 4)
    return -(-size // spacing) * spacing


def snapshot_rounding(cache: RedisSessionCache, writes: Sequence[SessionWrite]) -> float:
    """Mean bytes jemalloc adds to a stored snapshot value (an sds: 5-byte header + NUL)."""
    sizes = [len(cache.codec.encode_snapshot(w.snapshot)) for w in writes]
    return sum(jemalloc_class(n + 6) - n for n in sizes) / len(sizes)


def memory_breakdown(filled: Filled, sample: int = 200) -> dict[str, Any]:
    """``MEMORY USAGE`` of sample session hashes minus their payload, and of the run keys
    (hash + session set, shared by a run's ten sessions) per session."""
    cache = filled.cache
    client = cast(redis.Redis, cache.client)
    keys = filled.keys[:sample]
    hashes = []
    for key in keys:
        raw = cast(dict[bytes, bytes], client.hgetall(cache.keys.session(key)))
        payload = len(raw[b"snapshot"]) + len(raw[b"layer_specs"])
        hashes.append(int(client.memory_usage(cache.keys.session(key), samples=0) or 0) - payload)
    runs = {RunRef(key.tenant_id, key.workflow_run_id) for key in keys}
    run_bytes = sum(
        int(client.memory_usage(name, samples=0) or 0)
        for run in runs
        for name in (cache.keys.run(run), cache.keys.run_sessions(run))
    )
    members = sum(int(client.scard(cache.keys.run_sessions(run))) for run in runs)
    encoding = cast(bytes, client.object("encoding", cache.keys.session(keys[0])))
    return {
        "session_hash_beyond_payload": round(median(hashes)),
        "run_keys_per_session": round(run_bytes / max(members, 1)),
        "session_hash_encoding": encoding.decode(),
    }


def _result(
    samples: Mapping[str, list[list[int]]], plan: Plan, small: Filled, large: Filled
) -> Result:
    small_us = summarize(ns_to_us([s for b in samples["small"] for s in b]))
    large_us = summarize(ns_to_us([s for b in samples["large"] for s in b]))
    blocks = [
        round(ratio(median(s), median(lg)), 3)
        for s, lg in zip(samples["small"], samples["large"], strict=True)
    ]
    overhead = max(large.dirty_overhead, large.clean_overhead)
    memory_met = overhead < 1024
    extra: dict[str, Any] = {
        "spread": (
            f"block speed ratios {min(blocks):.2f}-{max(blocks):.2f}; "
            f"memory {overhead:.0f} B/session beyond payload (goal {MEMORY_GOAL} B: "
            f"{'met' if memory_met else 'MISSED'})"
        ),
        "also": [
            {
                "metric": "Redis memory per session beyond snapshot+specs bytes",
                "value": round(overhead),
                "unit": "B",
                "goal": MEMORY_GOAL,
                "met": memory_met,
            }
        ],
        "small_p50_us": round(small_us.median, 1),
        "large_p50_us": round(large_us.median, 1),
        "small_p99_us": round(small_us.p99, 1),
        "large_p99_us": round(large_us.p99, 1),
        "block_speed_ratios": blocks,
        "sessions_small": plan.small,
        "sessions_large": plan.large,
        "payload_bytes_mean": round(large.payload_bytes),
        "overhead_bytes_dirty": {
            "small": round(small.dirty_overhead),
            "large": round(large.dirty_overhead),
        },
        "overhead_bytes_clean": {
            "small": round(small.clean_overhead),
            "large": round(large.clean_overhead),
        },
        "of_which_snapshot_size_class_rounding": round(large.rounding),
        "memory_usage_breakdown": large.breakdown,
        "speed_met": goal_met(GOAL, round(small_us.median / large_us.median, 3)),
        "memory_met": memory_met,
    }
    return make_result(
        NAME,
        METRIC,
        value=round(small_us.median / large_us.median, 3),
        baseline=None,
        goal=GOAL,
        unit="x",
        goal_on="value",
        extra=extra,
    )


def run(quick: bool) -> Result:
    plan = QUICK if quick else FULL
    samples, small, large = _measure(plan)
    return _result(samples, plan, small, large)
