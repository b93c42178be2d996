"""hot_path: one loop iteration through ``RedisSessionCache`` against raw redis-py.

One iteration is what an Agent node in a loop costs the store: ``cache.load(key)`` and
``cache.save(key, write, expected_version=loaded.version)`` of an ~8 KB agent state over 1,000
existing sessions in random order. The state is :mod:`bench.agent_state`'s (``--snapshot
realistic``, the default: six layers, ~180 containers, a new state each iteration from a
cycle of 32; ``--snapshot small``: :func:`build_snapshot`, four layers and a 20-message
history of long strings, the same every iteration). The baseline, timed in the same run
against the same private server in alternating blocks, is the least a client can do for the
same work: one ``HGETALL`` of a hash holding the same fields and one ``EVALSHA`` of a
two-command script (``HSET`` the payload, ``HINCRBY`` the version) saving the same states.

The headline is that plain run. ``extra.cpu_warm_*`` is a shorter run of the same arms with a
busy-loop process keeping the vCPUs out of idle (the baselines' "CPU-warm" rows): on this VM a
round trip to an idle vCPU waits ~90 µs for its wake-up, which both arms pay and which
dilutes the ratio; warm, the wake-ups no longer dominate, so ``cpu_warm_ratio`` comes closer
to the arms' CPU ratio, and to what a loaded host sees.
"""

from __future__ import annotations

import itertools
import random
import statistics
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, cast

import msgspec
import redis
from redis.utils import HIREDIS_AVAILABLE

from bench.agent_state import AgentStates, agent_states
from bench.harness import (
    Blocks,
    Result,
    arm_p50_us,
    block_ratios,
    goal_met,
    make_result,
    median,
    ns_to_us,
    private_redis,
    ratio,
    run_interleaved,
    run_interleaved_warm,
    summarize,
    time_calls,
)
from cache.client import connect
from cache.codec import pack
from cache.records import LayerSpec, LifecycleState, SessionKey, SessionWrite, Snapshot
from cache.records import SnapshotLayer as Layer
from cache.settings import Settings
from cache.snapshot_json import RawSnapshot, text_of
from cache.store import RedisSessionCache

NAME = "hot_path"
METRIC = "per-iteration time (load+save, 8 KB)"
GOAL = "<= 1.35"
GOAL_VS_RAW_CODEC = "<= 1.12"
SNAPSHOT_BYTES = 8 * 1024
MESSAGES = 20
RAW_PREFIX = "bench:raw:"
RAW_SAVE_LUA = """
redis.call('HSET', KEYS[1], 'snapshot', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'version', 1)
"""
_WORDS = (
    "the", "agent", "calls", "a", "tool", "and", "reads", "its", "result", "before", "it",
    "answers", "user", "with", "short", "summary", "of", "order", "status", "invoice",
    "refund", "shipping", "date", "weather", "forecast", "next", "steps",
)  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """How much to run: ``blocks`` alternating blocks of ``per_block`` iterations per arm."""

    keys: int
    blocks: int
    per_block: int
    warmup: int
    warm_blocks: int  # then again with a busy-loop process keeping the vCPUs awake


QUICK = Plan(keys=1000, blocks=20, per_block=250, warmup=300, warm_blocks=6)
FULL = Plan(keys=1000, blocks=100, per_block=300, warmup=1000, warm_blocks=30)
"""Short blocks: this VM's speed drifts within a second, and arms that alternate every
~0.1 s see more nearly the same machine. Same code, same day: blocks of 3,000 gave ratios of
1.27-1.46 over five runs; blocks of 300, 1.31-1.40 over six."""
PROGRESS_EVERY = 10


# --------------------------------------------------------------------------------- workload


def _text(rng: random.Random, length: int) -> str:
    words: list[str] = []
    size = 0
    while size < length:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:length]


def _message(rng: random.Random, i: int, content_len: int) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "user" if i % 2 == 0 else "assistant",
        "content": _text(rng, content_len),
        "timestamp": f"2026-01-01T00:{i:02d}:00.000+00:00",
        "tokens": rng.randint(20, 400),
    }
    if i % 4 == 3:
        message["tool_calls"] = [{"id": f"call-{i}", "name": "lookup_order", "args": {"n": i}}]
    return message


def _layers(seed: int, content_len: int) -> tuple[Layer, ...]:
    rng = random.Random(seed)
    suspended = LifecycleState.SUSPENDED
    history = [_message(rng, i, content_len) for i in range(MESSAGES)]
    return (
        Layer("system_prompt", suspended, {"template": _text(rng, 300), "locale": "en-US"}),
        Layer("memory", suspended, {"facts": [_text(rng, 60) for _ in range(5)], "turns": 10}),
        Layer("tools", suspended, {"calls": [{"id": f"call-{i}", "ok": True} for i in range(4)]}),
        Layer("history", suspended, {"messages": history, "usage": {"in": 4100, "out": 2300}}),
    )


def build_snapshot(target_bytes: int = SNAPSHOT_BYTES, seed: int = 7) -> Snapshot:
    """A snapshot whose msgpack encoding is close to ``target_bytes`` (the small one)."""
    base = len(pack(Snapshot(_layers(seed, 0)).to_dict()))
    per_message = max(0, (target_bytes - base) // MESSAGES)
    return Snapshot(_layers(seed, per_message))


def build_specs() -> tuple[LayerSpec, ...]:
    return (
        LayerSpec("system_prompt", "dify.prompt.system", {}, {"v": 3}, {"max_tokens": 512}),
        LayerSpec("memory", "dify.memory.window", {"prompt": "system_prompt"}, {}, {"n": 20}),
        LayerSpec("tools", "dify.tools.http", {"memory": "memory"}, {}, {"timeout_s": 10}),
        LayerSpec("history", "pydantic_ai.history", {"memory": "memory"}, {}, {"max": 50}),
    )


def seeded_uuid(rng: random.Random) -> str:
    """A uuid4-shaped id drawn from ``rng`` (reproducible workloads)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def build_keys(count: int, seed: int = 11) -> list[SessionKey]:
    """``count`` distinct session keys: ten nodes per run, runs spread over seven tenants."""
    rng = random.Random(seed)
    runs = [seeded_uuid(rng) for _ in range(max(1, count // 10))]
    keys = []
    for i in range(count):
        run = i % len(runs)
        node = f"node-{i // len(runs)}"
        keys.append(SessionKey(f"tenant-{run % 7}", runs[run], node, "binding-1", "agent-1"))
    return keys


def build_write(
    seed: int = 13,
    snapshot: Snapshot | None = None,
    specs: Sequence[LayerSpec] | None = None,
) -> SessionWrite:
    """What a node's exit saves (by default :func:`build_snapshot` and :func:`build_specs`).
    On the real path the snapshot arrives as the backend's JSON answer (``decode_status``),
    so it is read from JSON here too: each layer's state stays JSON text, which the store
    checks as text."""
    rng = random.Random(seed)
    wire = msgspec.json.encode(build_snapshot() if snapshot is None else snapshot)
    return SessionWrite(
        snapshot=msgspec.json.decode(wire, type=RawSnapshot),
        layer_specs=tuple(build_specs() if specs is None else specs),
        app_id=seeded_uuid(rng),
        workflow_id=seeded_uuid(rng),
        node_execution_id=seeded_uuid(rng),
        agent_config_snapshot_id=seeded_uuid(rng),
        backend_run_id=seeded_uuid(rng),
    )


# --------------------------------------------------------------------------------- the two arms


def _cycle(order: Sequence[int]) -> Iterator[int]:
    return itertools.cycle(order)


def build_writes(states: AgentStates) -> list[SessionWrite]:
    """One write per state of ``states``, in order."""
    return [build_write(snapshot=snapshot, specs=states.specs) for snapshot in states.snapshots]


class OursLoop:
    """One loop iteration through ``RedisSessionCache``: load, then save at that version
    (each save the next of ``writes``, in turn)."""

    def __init__(
        self,
        cache: RedisSessionCache,
        keys: Sequence[SessionKey],
        order: Sequence[int],
        writes: Sequence[SessionWrite],
    ) -> None:
        self.cache = cache
        self.keys = keys
        self.write = writes[0]
        self._writes = itertools.cycle(writes)
        self._order = _cycle(order)

    def populate(self) -> None:
        for key in self.keys:
            self.cache.save(key, self.write)

    def __call__(self) -> None:
        key = self.keys[next(self._order)]
        loaded = self.cache.load(key)
        self.cache.save(key, next(self._writes), expected_version=loaded.version)


class RawLoop:
    """The same work with a bare client: ``HGETALL`` + ``EVALSHA`` of a two-command script
    saving ``payloads`` in turn (by default the snapshot copied from ours' last hash)."""

    def __init__(
        self,
        client: redis.Redis,
        names: Sequence[str],
        order: Sequence[int],
        payloads: Sequence[bytes] = (),
    ) -> None:
        self.client = client
        self.names = [f"{RAW_PREFIX}{i}" for i in range(len(names))]
        self._sources = names
        self._order = _cycle(order)
        self.sha = str(client.script_load(RAW_SAVE_LUA))
        self.payloads = list(payloads)
        self.payload = self.payloads[0] if self.payloads else b""
        self._payloads = itertools.cycle(self.payloads)

    def populate(self) -> None:
        """Copy every session hash of ours to a raw hash with the same fields and payload."""
        pipe = self.client.pipeline(transaction=False)
        for source, name in zip(self._sources, self.names, strict=True):
            fields = cast(dict[bytes, bytes], self.client.hgetall(source))
            pipe.hset(name, mapping=fields)  # type: ignore[arg-type]
            if not self.payloads:
                self.payload = fields[b"snapshot"]
        pipe.execute()
        if not self.payloads:
            self._payloads = itertools.cycle([self.payload])

    def __call__(self) -> None:
        name = self.names[next(self._order)]
        self.client.hgetall(name)
        self.client.evalsha(self.sha, 1, name, next(self._payloads))


class RawCodecLoop(RawLoop):
    """Raw plus a store that decodes what it loads and encodes what it saves: the stored
    snapshot's JSON decoded into plain values and encoded again.

    Informational only (``extra``): ours keeps states as text, so it can beat this arm.
    """

    def __call__(self) -> None:
        name = self.names[next(self._order)]
        fields = cast(dict[bytes, bytes], self.client.hgetall(name))
        payload = msgspec.json.encode(msgspec.json.decode(fields[b"snapshot"]))
        self.client.evalsha(self.sha, 1, name, payload)


# --------------------------------------------------------------------------------- running


def _progress(plan: Plan) -> Any:
    def report(index: int, block: Mapping[str, list[int]]) -> None:
        if (index + 1) % PROGRESS_EVERY and index + 1 != plan.blocks:
            return
        ours, raw = median(block["ours"]) / 1000, median(block["raw"]) / 1000
        codec = median(block["raw_codec"]) / 1000
        print(
            f"  block {index + 1:>2}/{plan.blocks}: ours {ours:6.1f} us  raw {raw:6.1f} us  "
            f"ratio {ours / raw:.2f}  (raw+codec {codec:6.1f} us)",
            flush=True,
        )

    return report


def _codec_costs(cache: RedisSessionCache, ours: OursLoop) -> dict[str, float]:
    """Client-side CPU of the codec alone (no I/O), median µs: where our overhead goes."""
    key = ours.keys[0]
    name = cache.keys.session(key)
    raw = cast(dict[bytes, bytes], cache.client.hgetall(name))
    decode = time_calls(lambda: cache.codec.decode_session(name, key, raw), 2000)
    encode = time_calls(lambda: cache.codec.write_values(ours.write), 2000)
    return {
        "decode_session": round(median(decode) / 1000, 1),
        "write_values": round(median(encode) / 1000, 1),
    }


def _deciles(values: Sequence[float]) -> tuple[float, float]:
    """The 10th and 90th percentiles of ``values``."""
    if len(values) < 2:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=10)
    return cuts[0], cuts[-1]


def _measure(
    url: str, plan: Plan, states: AgentStates
) -> tuple[dict[str, list[list[int]]], dict[str, Any]]:
    """Set both arms up on the server at ``url``, run them interleaved; samples and facts."""
    keys = build_keys(plan.keys)
    order = list(range(len(keys)))
    random.Random(17).shuffle(order)
    writes = build_writes(states)
    with ExitStack() as stack:
        settings = Settings(redis_url=url)
        ours_client = stack.enter_context(cast(redis.Redis, connect(settings)))
        raw_client = stack.enter_context(redis.Redis.from_url(url))
        cache = RedisSessionCache(ours_client, settings)
        ours = OursLoop(cache, keys, order, writes)
        ours.populate()
        payloads = [text_of(write.snapshot) for write in writes]
        raw = RawLoop(raw_client, [cache.keys.session(key) for key in keys], order, payloads)
        raw.populate()
        codec = RawCodecLoop(raw_client, raw.names, order)
        print(f"  {len(keys)} sessions of {len(raw.payload):,} B snapshot; timing…", flush=True)
        arms: dict[str, Callable[[], object]] = {"ours": ours, "raw": raw, "raw_codec": codec}
        samples = run_interleaved(
            arms,
            blocks=plan.blocks,
            per_block=plan.per_block,
            warmup=plan.warmup,
            on_block=_progress(plan),
        )
        warm = run_interleaved_warm(
            arms, blocks=plan.warm_blocks, per_block=plan.per_block, warmup=plan.warmup
        )
        facts = {
            **states.facts(),
            "snapshot_bytes": len(raw.payload),
            "hash_fields": len(cast(dict[bytes, bytes], raw_client.hgetall(raw.names[0]))),
            "codec_us": _codec_costs(cache, ours),
            "hiredis": HIREDIS_AVAILABLE,
            **_warm_facts(warm),
        }
    return samples, facts


def _warm_facts(warm: Blocks) -> dict[str, Any]:
    """The CPU-warm pass: with the vCPUs kept out of idle, a round trip no longer waits for a
    wake-up, so the ratio comes closer to the arms' CPU ratio (the plain run's wake-ups, which
    both arms pay, dilute it)."""
    ours, raw, codec = (arm_p50_us(warm, arm) for arm in ("ours", "raw", "raw_codec"))
    return {
        "cpu_warm_ours_p50_us": round(ours, 1),
        "cpu_warm_raw_p50_us": round(raw, 1),
        "cpu_warm_raw_codec_p50_us": round(codec, 1),
        "cpu_warm_ratio": round(ratio(ours, raw), 3),
        "cpu_warm_ratio_vs_raw_codec": round(ratio(ours, codec), 3),
        "cpu_warm_block_ratios": block_ratios(warm, "ours", "raw"),
    }


def _result(samples: Mapping[str, list[list[int]]], plan: Plan, facts: dict[str, Any]) -> Result:
    ours, raw, codec = (
        summarize(ns_to_us([s for block in samples[arm] for s in block]))
        for arm in ("ours", "raw", "raw_codec")
    )
    blocks = block_ratios(samples, "ours", "raw")
    low, high = _deciles(blocks)
    spread = (
        f"block ratios {low:.2f}-{high:.2f} (p10-p90 of {len(blocks)}); "
        f"p99 {ours.p99:.0f} vs {raw.p99:.0f} us"
    )
    extra = {
        "spread": spread,
        "ours_p50_us": round(ours.median, 1),
        "ours_p99_us": round(ours.p99, 1),
        "raw_p50_us": round(raw.median, 1),
        "raw_p99_us": round(raw.p99, 1),
        "block_ratios": blocks,
        "raw_codec_p50_us": round(codec.median, 1),
        "ratio_vs_raw_codec": round(ratio(ours.median, codec.median), 3),
        "goal_vs_raw_codec": GOAL_VS_RAW_CODEC,
        "met_vs_raw_codec": goal_met(GOAL_VS_RAW_CODEC, ratio(ours.median, codec.median)),
        "iterations_per_arm": ours.count,
        "blocks": plan.blocks,
        "per_block": plan.per_block,
        "warmup": plan.warmup,
        "cpu_warm_blocks": plan.warm_blocks,
        "note": (
            "cpu_warm_*: the same arms with a 1-core busy loop running, which keeps the vCPUs "
            "out of idle (baselines.md idle-vCPU caveat); the headline is the plain run"
        ),
        "keys": plan.keys,
        **facts,
    }
    return make_result(
        NAME,
        METRIC,
        value=round(ours.median, 1),
        baseline=round(raw.median, 1),
        goal=GOAL,
        unit="us",
        extra=extra,
    )


def run(quick: bool, snapshot: str | None = None) -> Result:
    plan = QUICK if quick else FULL
    states = agent_states(snapshot)
    with private_redis() as url:
        samples, facts = _measure(url, plan, states)
    return _result(samples, plan, facts)
