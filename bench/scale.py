"""scale: does a loop iteration slow down, and what does a session cost, with 100k sessions?

Private Redis servers, filled through the save script (pipelined) with the same ~8 KB
snapshot mix (``--snapshot realistic``, the default: 16 consecutive states of
:mod:`bench.agent_state`, 7.9-8.5 KB; ``--snapshot small``: the small snapshot at 16 sizes
over 6-10 KB; each session keeps its own): **small** holds 1,000 live sessions, **large**
100,000 (``--quick``: 20,000), ten Agent nodes per workflow run, each size in two hash
encodings: **default** (Redis' ``hash-max-listpack-value 64``: a session hash holding an
8 KB value is a hashtable) and **listpack** (``hash-max-listpack-value 16384``: the whole
session hash is one listpack). The fill is then acknowledged as flushed (``ack_flush`` per
shard, as a flush would), so the sessions are in their steady state: clean, with TTLs. One
iteration = ``RedisSessionCache.load`` + ``save`` at the loaded version of a random session,
which it finds clean (what the blocks saved is acknowledged between them, untimed, as a
flush between a loop's iterations would); the four servers are timed in alternating blocks.

- value = speed large/small on the default encoding = per-iteration time small / large (goal
  >= 0.9: no slowdown with size); the listpack servers' speed and the listpack/default speed
  at the large size are in ``extra``.
- memory, per encoding: ``INFO memory`` ``used_memory`` delta over the fill / sessions - the
  encoded snapshot + specs bytes, for the dirty state (right after the saves) and the clean
  state (after the acknowledgement). Redis accounts allocated sizes, so that overhead includes
  the jemalloc size-class rounding of the allocation holding the payload (the snapshot and
  specs values in a hashtable, the whole listpack in a listpack); ``extra`` reports it and
  the overhead without it (goal <= 1,100 B per dirty session, without rounding).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from bench.agent_state import SMALL, AgentStates, agent_states
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
from bench.hot_path import build_keys, build_snapshot, build_write
from bench.stack import (
    bulk_save,
)
from cache.client import connect
from cache.records import Owner, SessionKey, SessionWrite, Snapshot
from cache.settings import Settings
from cache.snapshot_json import encode_checked
from cache.store import RedisSessionCache

NAME = "scale"
METRIC = "iteration speed with many live sessions, large/small"
GOAL = ">= 0.9"
MEMORY_GOAL = "<= 1100"
VARIANTS = 16  # distinct snapshots in a fill (sessions take them in turn)
ACK_CHUNK = 500
ENCODINGS: dict[str, dict[str, str]] = {
    "default": {},
    "listpack": {"hash-max-listpack-value": "16384"},
}


@dataclass(frozen=True)
class Plan:
    small: int
    large: int
    blocks: int
    per_block: int
    warmup: int


QUICK = Plan(small=1_000, large=20_000, blocks=6, per_block=400, warmup=200)
FULL = Plan(small=1_000, large=100_000, blocks=15, per_block=1000, warmup=500)
"""``per_block`` <= ``small``: no session is saved twice between two settles."""


def _snapshots(states: AgentStates) -> list[Snapshot]:
    """:data:`VARIANTS` snapshots: the realistic states in turn, or the small one at sizes
    spread over 6-10 KB, like real histories of varying length."""
    if states.kind != SMALL:
        return [states.snapshots[i % len(states.snapshots)] for i in range(VARIANTS)]
    sizes = [6 * 1024 + i * 4 * 1024 // (VARIANTS - 1) for i in range(VARIANTS)]
    return [build_snapshot(size, seed=31 + i) for i, size in enumerate(sizes)]


def build_writes(states: AgentStates) -> list[SessionWrite]:
    base = build_write()
    return [
        SessionWrite(
            snapshot=snapshot,
            layer_specs=states.specs,
            app_id=base.app_id,
            workflow_id=base.workflow_id,
            node_execution_id=base.node_execution_id,
            agent_config_snapshot_id=base.agent_config_snapshot_id,
            backend_run_id=base.backend_run_id,
        )
        for snapshot in _snapshots(states)
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

    def memory(self) -> dict[str, int]:
        """Bytes per session beyond the payload, with and without the payload's rounding."""
        return {
            "dirty": round(self.dirty_overhead),
            "clean": round(self.clean_overhead),
            "payload_rounding": round(self.rounding),
            "dirty_without_rounding": round(self.dirty_overhead - self.rounding),
            "clean_without_rounding": round(self.clean_overhead - self.rounding),
        }


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _payload_bytes(cache: RedisSessionCache, writes: Sequence[SessionWrite], n: int) -> float:
    """Mean encoded snapshot + specs bytes over the ``n`` sessions (writes cycle)."""
    sizes = [
        len(encode_checked(w.snapshot, cache.codec.max_snapshot_bytes))
        + len(cache.codec.encode_specs(w.layer_specs))
        for w in writes
    ]
    return sum(sizes[i % len(sizes)] for i in range(n)) / n


def _ack_all(cache: RedisSessionCache, saved: Sequence[tuple[SessionKey, int]]) -> None:
    """Acknowledge every ``(session, version)``, as a flush of all of them would."""
    by_shard: dict[int, list[tuple[str, int]]] = {}
    for key, version in saved:
        name = cache.keys.session(key)
        by_shard.setdefault(cache.keys.shard_of_key(key), []).append((name, version))
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
    _ack_all(cache, [(key, 1) for key in keys])
    filled.clean_overhead = (_used_memory(client) - before) / count - filled.payload_bytes
    filled.breakdown = memory_breakdown(filled)
    filled.rounding = filled.breakdown["payload_rounding"]
    return filled


class Iteration:
    """Load + save at the loaded version of a random session, keeping its snapshot size.

    Sessions come in a shuffled cycle (no session twice within ``len(keys)`` calls), and
    :meth:`settle` acknowledges what was saved (untimed, between blocks), so every timed
    save finds its session clean, on both servers alike: a loop whose iterations are flushed
    in between. (Without it the small server's sessions would all be dirty after one cycle
    and take the cheaper already-dirty path, while the large one's are clean.)
    """

    def __init__(self, filled: Filled, writes: Sequence[SessionWrite], seed: int) -> None:
        self.cache = filled.cache
        self.keys = filled.keys
        self.writes = writes
        order = list(range(len(self.keys)))
        random.Random(seed).shuffle(order)
        self._order = itertools.cycle(order)
        self._saved: list[tuple[SessionKey, int]] = []

    def __call__(self) -> None:
        i = next(self._order)
        key = self.keys[i]
        loaded = self.cache.load(key)
        version = self.cache.save(
            key, self.writes[i % len(self.writes)], expected_version=loaded.version
        )
        self._saved.append((key, version))

    def settle(self) -> None:
        """Acknowledge every save since the last call, as a flush would."""
        _ack_all(self.cache, self._saved)
        self._saved.clear()


def _progress(plan: Plan) -> Callable[[int, Mapping[str, list[int]]], None]:
    def report(index: int, block: Mapping[str, list[int]]) -> None:
        us = {arm: median(samples) / 1000 for arm, samples in block.items()}
        print(
            f"  block {index + 1:>2}/{plan.blocks}: "
            + "  ".join(f"{arm} {value:6.1f} us" for arm, value in us.items()),
            flush=True,
        )

    return report


def _open_cache(stack: ExitStack, config: Mapping[str, str]) -> RedisSessionCache:
    url = stack.enter_context(private_redis())
    settings = Settings(redis_url=url)
    client = stack.enter_context(cast(redis.Redis, connect(settings)))
    for name, value in config.items():
        client.config_set(name, value)
    return RedisSessionCache(client, settings)


def _measure(
    plan: Plan, states: AgentStates
) -> tuple[dict[str, list[list[int]]], dict[str, Filled]]:
    writes = build_writes(states)
    filled: dict[str, Filled] = {}
    with ExitStack() as stack:
        for encoding, config in ENCODINGS.items():
            for size, count in (("small", plan.small), ("large", plan.large)):
                filled[f"{size}_{encoding}"] = fill(_open_cache(stack, config), count, writes)
                print(f"  {size} ({encoding} encoding): {count:,} sessions filled", flush=True)
        print("  timing…", flush=True)
        arms = {arm: Iteration(one, writes, 5) for arm, one in filled.items()}
        for arm in arms.values():
            for _ in range(plan.warmup):
                arm()
            arm.settle()
        report = _progress(plan)

        def settle_then_report(index: int, block: Mapping[str, list[int]]) -> None:
            for arm in arms.values():
                arm.settle()
            report(index, block)

        samples = run_interleaved(
            arms, blocks=plan.blocks, per_block=plan.per_block, on_block=settle_then_report
        )
    return samples, filled


def jemalloc_class(size: int) -> int:
    """The allocation jemalloc makes for ``size`` bytes: four size classes per doubling."""
    if size <= 16:
        return 8 if size <= 8 else 16
    spacing = 1 << max((size - 1).bit_length() - 3, 4)
    return -(-size // spacing) * spacing


def _sds_bytes(length: int) -> int:
    """An sds string's requested size: header (by length) + bytes + NUL."""
    header = 3 if length < 1 << 8 else 5 if length < 1 << 16 else 9
    return header + length + 1


def _listpack_int_bytes(value: bytes) -> int | None:
    """Bytes of a listpack integer entry, or None when Redis keeps ``value`` as a string."""
    number = _as_int(value)
    if number is None or len(value) > 20 or value != str(number).encode():
        return None
    limits = [(0, 127, 1), (-4096, 4095, 2)]  # 7-bit unsigned, 13-bit signed
    limits += [(-(1 << bits), (1 << bits) - 1, bits // 8 + 2) for bits in (15, 23, 31)]
    return next((size for low, high, size in limits if low <= number <= high), 9)


def _as_int(value: bytes) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def _listpack_entry(value: bytes) -> int:
    """One listpack entry: encoding header + data, then its back-length."""
    body = _listpack_int_bytes(value)
    if body is None:
        n = len(value)
        body = n + (1 if n < 64 else 2 if n < 4096 else 5)
    backlen = 1 if body <= 127 else 2 if body < 16383 else 3
    return body + backlen


def listpack_bytes(fields: Mapping[bytes, bytes]) -> int:
    """Size of the listpack holding ``fields``: 6-byte header, entries, end byte."""
    return 7 + sum(_listpack_entry(k) + _listpack_entry(v) for k, v in fields.items())


def payload_rounding(fields: Mapping[bytes, bytes], encoding: str) -> int:
    """Bytes jemalloc adds to the allocation(s) holding the payload of one session hash: the
    whole listpack in a listpack, the snapshot and specs values in a hashtable."""
    if encoding == "listpack":
        size = listpack_bytes(fields)
        return jemalloc_class(size) - size
    sizes = (_sds_bytes(len(fields[name])) for name in (b"snapshot", b"layer_specs"))
    return sum(jemalloc_class(size) - size for size in sizes)


def memory_breakdown(filled: Filled, sample: int = 200) -> dict[str, Any]:
    """``MEMORY USAGE`` of sample session hashes minus their payload, the payload's rounding,
    and the run keys (hash + session set, shared by a run's ten sessions) per session."""
    cache = filled.cache
    client = cast(redis.Redis, cache.client)
    keys = filled.keys[:sample]
    encoding = cast(bytes, client.object("encoding", cache.keys.session(keys[0]))).decode()
    hashes, rounding = [], []
    for key in keys:
        raw = cast(dict[bytes, bytes], client.hgetall(cache.keys.session(key)))
        payload = len(raw[b"snapshot"]) + len(raw[b"layer_specs"])
        hashes.append(int(client.memory_usage(cache.keys.session(key), samples=0) or 0) - payload)
        rounding.append(payload_rounding(raw, encoding))
    runs = {Owner(key.tenant_id, key.owner_id) for key in keys}
    run_bytes = sum(
        int(client.memory_usage(name, samples=0) or 0)
        for run in runs
        for name in (cache.keys.owner(run), cache.keys.owner_sessions(run))
    )
    members = sum(int(client.scard(cache.keys.owner_sessions(run))) for run in runs)
    return {
        "session_hash_beyond_payload": round(median(hashes)),
        "payload_rounding": round(sum(rounding) / len(rounding)),
        "run_keys_per_session": round(run_bytes / max(members, 1)),
        "session_hash_encoding": encoding,
    }


def _speed(samples: Mapping[str, list[list[int]]], small: str, large: str) -> float:
    return round(_p50(samples, small) / _p50(samples, large), 3)


def _p50(samples: Mapping[str, list[list[int]]], arm: str) -> float:
    return summarize(ns_to_us([s for b in samples[arm] for s in b])).median


def _memory_row(encoding: str, filled: Filled) -> dict[str, Any]:
    value = round(filled.dirty_overhead - filled.rounding)
    return {
        "metric": f"Redis bytes per dirty session beyond payload, without rounding ({encoding})",
        "value": value,
        "unit": "B",
        "goal": MEMORY_GOAL,
        "met": goal_met(MEMORY_GOAL, value),
    }


def _result(
    samples: Mapping[str, list[list[int]]],
    plan: Plan,
    filled: Mapping[str, Filled],
    states: AgentStates,
) -> Result:
    speed = _speed(samples, "small_default", "large_default")
    blocks = [
        round(ratio(median(s), median(lg)), 3)
        for s, lg in zip(samples["small_default"], samples["large_default"], strict=True)
    ]
    rows = [_memory_row(encoding, filled[f"large_{encoding}"]) for encoding in ENCODINGS]
    extra: dict[str, Any] = {
        "spread": (
            f"block speed ratios {min(blocks):.2f}-{max(blocks):.2f}; per dirty session "
            + ", ".join(
                f"{row['value']} B ({encoding})"
                for row, encoding in zip(rows, ENCODINGS, strict=True)
            )
            + f" beyond payload without rounding (goal {MEMORY_GOAL} B)"
        ),
        "also": rows,
        "p50_us": {arm: round(_p50(samples, arm), 1) for arm in filled},
        "block_speed_ratios": blocks,
        "speed_listpack_large_small": _speed(samples, "small_listpack", "large_listpack"),
        "speed_listpack_vs_default_large": _speed(samples, "large_default", "large_listpack"),
        "sessions_small": plan.small,
        "sessions_large": plan.large,
        "payload_bytes_mean": round(filled["large_default"].payload_bytes),
        "memory_bytes_per_session": {arm: one.memory() for arm, one in filled.items()},
        "memory_usage_breakdown": {arm: one.breakdown for arm, one in filled.items()},
        "speed_met": goal_met(GOAL, speed),
        **states.facts(),
    }
    return make_result(
        NAME, METRIC, value=speed, baseline=None, goal=GOAL, unit="x", goal_on="value", extra=extra
    )


def run(quick: bool, snapshot: str | None = None) -> Result:
    plan = QUICK if quick else FULL
    states = agent_states(snapshot, count=VARIANTS)
    samples, filled = _measure(plan, states)
    return _result(samples, plan, filled, states)
