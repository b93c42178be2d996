"""loop_vs_postgres: one Agent-node loop iteration, ours against the Postgres-only original.

One iteration is what a loop costs between two backend runs, through the real node path,
with only the backend's own time left out: **ours** = ``SessionLifecycle.enter(scope)``,
``build_request`` and its JSON encoding (what the client sends), the backend's answer
decoded from its JSON bytes (an ~8 KB agent state; the client's decoder),
``RunOutcome.from_status`` and ``finish``, with a real ``agent-sessions worker`` pool flushing
to Postgres in the background (default ``flush_delay_ms`` 1000). **original** =
:mod:`bench.pg_original`: ``load_active_session`` (ORM select by the five key columns +
``status = active``, JSON decode) then ``save_active_snapshot`` (ORM select by key, update
the attributes, ``commit()``) of the same state as protocol JSON. Both use the same Postgres
server and database, the same sessions (10 runs x 10 nodes, random order), in alternating
blocks. The states are :mod:`bench.agent_state`'s (``--snapshot realistic``, the default: a
new state each iteration, the same sequence in every arm; ``--snapshot small``: the one
four-layer snapshot of before).

Also timed in the same blocks (``extra``): **raw**, the floor of any Redis-backed loop on
this machine: ``hot_path``'s raw arm (redis-py ``HGETALL`` + ``EVALSHA`` of a two-command
save script) on copies of ours' session hashes, with no decoding, validation or request
building. ``floor_ratio`` = raw / original is the best ``ratio`` any implementation could
report here.

:class:`LoopWorkload` is shared with ``parallel_loops``.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import redis

from agent_backend.models import (
    RunComposition,
    RunStatusResponse,
    decode_status,
    encode_json,
)
from bench.agent_state import SMALL, AgentStates, agent_states
from bench.harness import (
    Result,
    arm_p50_us,
    block_ratios,
    make_result,
    median,
    ours_vs_original_facts,
    ours_vs_original_progress,
    private_redis,
    run_interleaved,
    run_interleaved_warm,
    time_calls,
)
from bench.hot_path import RawLoop, build_specs, seeded_uuid
from bench.pg_original import (
    CompositorSessionSnapshot,
    OriginalSessionStore,
    RunLayerSpec,
    create_engine,
    create_table,
    original_snapshot,
    original_specs,
)
from bench.stack import (
    bench_settings,
    migrated_database,
    worker_context,
    worker_pool,
)
from cache.records import LayerSpec, Scope, SessionKey, SessionWrite, Snapshot
from cache.settings import Settings
from cache.snapshot_json import text_of
from workers.drain import drain

if TYPE_CHECKING:
    from agent_sessions.lifecycle import SessionLifecycle
    from workers.context import WorkerContext

NAME = "loop_vs_postgres"
METRIC = "per-iteration time (enter+finish, 8 KB) vs Postgres-only original"
GOAL = "<= 0.13"
WORKERS = 2
LLM_LAYER = LayerSpec(
    name="llm", type="dify.plugin.llm", config={"model": "gpt-x", "credentials": {"k": "sk"}}
)


@dataclass(frozen=True)
class Plan:
    runs: int
    nodes: int
    blocks: int
    per_block: int
    warmup: int
    warm_blocks: int  # then again with a busy-loop process keeping the vCPUs awake


QUICK = Plan(runs=10, nodes=10, blocks=4, per_block=150, warmup=50, warm_blocks=2)
FULL = Plan(runs=10, nodes=10, blocks=8, per_block=800, warmup=200, warm_blocks=4)


# --------------------------------------------------------------------------------- workload


def build_scopes(runs: int, nodes: int, seed: int) -> list[Scope]:
    """``runs`` workflow runs of one tenant and app, ``nodes`` Agent nodes each (uuid ids:
    the original's columns are ``uuid``)."""
    rng = random.Random(seed)
    tenant, app, workflow = seeded_uuid(rng), seeded_uuid(rng), seeded_uuid(rng)
    binding, agent, config = seeded_uuid(rng), seeded_uuid(rng), seeded_uuid(rng)
    scopes = []
    for _ in range(runs):
        run = seeded_uuid(rng)
        scopes += [
            Scope(
                tenant,
                app,
                workflow,
                run,
                f"agent-node-{n}",
                seeded_uuid(rng),
                binding,
                agent,
                config,
            )
            for n in range(nodes)
        ]
    return scopes


def build_composition(specs: Sequence[LayerSpec] | None = None) -> RunComposition:
    """What a node sends: the replayable layers (by default :func:`bench.hot_path.build_specs`)
    plus a credential-bearing model layer."""
    return RunComposition(layers=[*(build_specs() if specs is None else specs), LLM_LAYER])


def build_answer(composition: RunComposition, snapshot: Snapshot) -> bytes:
    """The JSON of the backend's terminal status: succeeded, with ``snapshot`` aligned to the
    composition the lifecycle sends (``history`` added when missing)."""
    from agent_sessions.requests import with_history

    names = with_history(composition).layer_names()
    now = datetime.now(UTC)
    status = RunStatusResponse(
        run_id=str(uuid.uuid4()),
        status="succeeded",
        created_at=now,
        updated_at=now,
        session_snapshot=snapshot.aligned_to(names),
    )
    return encode_json(status)


@dataclass(frozen=True)
class Payloads:
    """One agent state per iteration in turn, in each arm's form: the backend's JSON answer
    (ours), the original's pydantic snapshot, and the JSON ours stores (raw)."""

    composition: RunComposition
    answers: tuple[bytes, ...]
    originals: tuple[CompositorSessionSnapshot, ...]
    stored: tuple[bytes, ...]
    specs_proto: list[RunLayerSpec]

    @classmethod
    def build(cls, states: AgentStates) -> Payloads:
        composition = build_composition(states.specs)
        answers = tuple(build_answer(composition, snapshot) for snapshot in states.snapshots)
        aligned = [decode_status(answer).session_snapshot for answer in answers]
        return cls(
            composition,
            answers,
            tuple(original_snapshot(cast(Snapshot, snapshot)) for snapshot in aligned),
            tuple(text_of(cast(Snapshot, snapshot)) for snapshot in aligned),
            original_specs(states.specs),
        )


@dataclass(frozen=True)
class LoopWorkload:
    """Sessions and payloads of one loop benchmark process; every arm iterates the same
    sessions in the same order and saves the same states in the same order."""

    scopes: list[Scope]
    order: list[int]
    payloads: Payloads

    @classmethod
    def build(
        cls, runs: int, nodes: int, seed: int, states: AgentStates | None = None
    ) -> LoopWorkload:
        """``states`` default to the small snapshot (``coalescing`` and ``cleanup`` save it)."""
        scopes = build_scopes(runs, nodes, seed)
        order = list(range(len(scopes)))
        random.Random(seed + 1).shuffle(order)
        return cls(scopes, order, Payloads.build(states or agent_states(SMALL)))

    @property
    def composition(self) -> RunComposition:
        return self.payloads.composition

    @property
    def snapshot_proto(self) -> CompositorSessionSnapshot:
        """The first state as the original's pydantic snapshot."""
        return self.payloads.originals[0]

    @property
    def specs_proto(self) -> list[RunLayerSpec]:
        return self.payloads.specs_proto

    def cycle(self) -> Iterator[Scope]:
        while True:
            for i in self.order:
                yield self.scopes[i]


def ours_iteration(lifecycle: SessionLifecycle, workload: LoopWorkload) -> Callable[[], object]:
    """The node path through :class:`SessionLifecycle`, the backend's own time left out:
    ``enter``, ``build_request`` (and its JSON, as the client sends it), the answer's JSON
    decoded as the client decodes it, ``RunOutcome.from_status``, ``finish``."""
    from agent_sessions.outcomes import RunOutcome

    scopes = workload.cycle()
    answers = itertools.cycle(workload.payloads.answers)

    def iteration() -> object:
        scope = next(scopes)
        entry = lifecycle.enter(scope)
        request = lifecycle.build_request(scope, entry, workload.composition)
        encode_json(request)
        status = decode_status(next(answers))
        result = lifecycle.finish(scope, entry, RunOutcome.from_status(request, status))
        if result.version is None:
            raise RuntimeError(f"save failed: {result.metadata}")
        return result

    return iteration


def original_iteration(store: OriginalSessionStore, workload: LoopWorkload) -> Callable[[], object]:
    """``load_active_session`` + ``save_active_snapshot`` of the original store."""
    scopes = workload.cycle()
    snapshots = itertools.cycle(workload.payloads.originals)
    backend_run_id = str(uuid.uuid4())

    def iteration() -> object:
        scope = next(scopes)
        store.load_active_session(scope)
        store.save_active_snapshot(
            scope,
            backend_run_id=backend_run_id,
            snapshot=next(snapshots),
            layer_specs=workload.specs_proto,
        )
        return None

    return iteration


@dataclass
class LoopArms:
    """The arms, ready to call, over one workload (sessions created by one call of ours and
    the original each; raw copies ours' session hashes once they exist)."""

    ours: Callable[[], object]
    original: Callable[[], object]
    sessions: int
    raw: Callable[[], object] = lambda: None

    def populate(self) -> None:
        for _ in range(self.sessions):
            self.ours()
            self.original()


@contextmanager
def loop_arms(settings: Settings, workload: LoopWorkload) -> Iterator[LoopArms]:
    """Our lifecycle, the original store and the raw floor for ``workload`` on
    ``settings``' servers."""
    from agent_sessions.lifecycle import SessionLifecycle

    with worker_context(settings) as ctx:
        engine = create_engine(settings.database_url)
        try:
            arms = LoopArms(
                ours_iteration(SessionLifecycle(ctx), workload),
                original_iteration(OriginalSessionStore(engine), workload),
                len(workload.scopes),
            )
            arms.populate()
            arms.raw = raw_arm(ctx, workload)
            yield arms
        finally:
            engine.dispose()


# --------------------------------------------------------------------------------- running


def _measure(plan: Plan, states: AgentStates) -> tuple[dict[str, list[list[int]]], dict[str, Any]]:
    workload = LoopWorkload.build(plan.runs, plan.nodes, seed=23, states=states)
    with ExitStack() as stack:
        redis_url = stack.enter_context(private_redis())
        db_url = stack.enter_context(migrated_database())
        settings = bench_settings(redis_url, db_url)
        create_table(db_url)
        stack.enter_context(worker_pool(settings, WORKERS))
        arms = stack.enter_context(loop_arms(settings, workload))
        ctx = stack.enter_context(worker_context(settings))
        before = ctx.cache.counters().get("rows_flushed", 0)
        print(f"  {arms.sessions} sessions, {WORKERS} flush workers; timing…", flush=True)
        both = dict(ours=arms.ours, original=arms.original, raw=arms.raw)
        samples = run_interleaved(
            both,
            blocks=plan.blocks,
            per_block=plan.per_block,
            warmup=plan.warmup,
            on_block=ours_vs_original_progress(plan.blocks),
        )
        flushed = ctx.cache.counters().get("rows_flushed", 0) - before
        warm = _cpu_warm_facts(both, plan)
        drain(ctx)  # the workers go idle: the steps below are timed alone
        costs = node_path_costs(ctx, workload)
    facts = {
        "rows_flushed_meanwhile": flushed,
        "flush_workers": WORKERS,
        "node_path_step_us": costs,
        "raw_plus_protocol_json_p50_us": round(
            arm_p50_us(samples, "raw") + costs["request_json"] + costs["answer_json"], 1
        ),
        **warm,
    }
    return samples, facts


def _cpu_warm_facts(arms: Mapping[str, Callable[[], object]], plan: Plan) -> dict[str, Any]:
    """The arms again, with a busy-loop process keeping the vCPUs awake."""
    warm = run_interleaved_warm(
        arms,
        blocks=plan.warm_blocks,
        per_block=plan.per_block,
        warmup=plan.warmup,
        on_block=ours_vs_original_progress(plan.warm_blocks),
    )
    return _warm_facts(warm)


def node_path_costs(ctx: WorkerContext, workload: LoopWorkload) -> dict[str, float]:
    """Time of each step of an iteration that does no I/O, median µs of 2,000 calls on one
    session, with the flush backlog drained (the workers idle): where ours spends beyond the
    raw floor. ``request_json`` and ``answer_json`` are what any node speaking the backend's
    JSON protocol pays."""
    from agent_sessions.lifecycle import SessionLifecycle
    from agent_sessions.outcomes import RunOutcome

    lifecycle = SessionLifecycle(ctx)
    scope = workload.scopes[0]
    key = cast(SessionKey, scope.key)
    cache = ctx.cache
    name = cache.keys.session(key)
    entry = lifecycle.enter(scope)
    request = lifecycle.build_request(scope, entry, workload.composition)
    answer = workload.payloads.answers[0]
    status = decode_status(answer)
    outcome = RunOutcome.from_status(request, status)
    write = SessionWrite.for_scope(scope, cast(Snapshot, outcome.snapshot))
    stored = cast(dict[bytes, bytes], cache.client.hgetall(name))
    steps: dict[str, Callable[[], object]] = {
        "decode_session": lambda: cache.codec.decode_session(name, key, stored),
        "build_request": lambda: lifecycle.build_request(scope, entry, workload.composition),
        "request_json": lambda: encode_json(request),
        "answer_json": lambda: decode_status(answer),
        "from_status": lambda: RunOutcome.from_status(request, status),
        "save_encoding": lambda: cache.save_call(key, write, expected_version=1),
    }
    return {step: round(median(time_calls(fn, 2000)) / 1000, 1) for step, fn in steps.items()}


def raw_arm(ctx: WorkerContext, workload: LoopWorkload) -> RawLoop:
    """The raw floor over copies of the workload's session hashes, in the same order, saving
    the same states."""
    names = [ctx.cache.keys.session(cast(SessionKey, scope.key)) for scope in workload.scopes]
    client = cast(redis.Redis, ctx.cache.client)
    raw = RawLoop(client, names, workload.order, workload.payloads.stored)
    raw.populate()
    return raw


def _warm_facts(warm: Mapping[str, list[list[int]]]) -> dict[str, Any]:
    ours, original, raw = (arm_p50_us(warm, arm) for arm in ("ours", "original", "raw"))
    return {
        "cpu_warm_ours_p50_us": round(ours, 1),
        "cpu_warm_original_p50_us": round(original, 1),
        "cpu_warm_raw_p50_us": round(raw, 1),
        "cpu_warm_ratio": round(ours / original, 3),
        "cpu_warm_floor_ratio": round(raw / original, 3),
        "cpu_warm_block_ratios": block_ratios(warm),
    }


def _result(samples: Mapping[str, list[list[int]]], plan: Plan, facts: dict[str, Any]) -> Result:
    ours, original, extra = ours_vs_original_facts(samples)
    extra |= {
        "note": (
            "cpu_warm_*: the same blocks with a 1-core busy loop running, which keeps the "
            "vCPUs out of idle (baselines.md idle-vCPU caveat); the headline is the plain run"
        ),
        "iterations_per_arm": ours.count,
        "sessions": plan.runs * plan.nodes,
        "blocks": plan.blocks,
        "per_block": plan.per_block,
        "what": (
            "ours = enter, build_request + its JSON, the backend answer's JSON decoded, "
            "RunOutcome.from_status, finish(succeeded), with a worker pool flushing in the "
            "background; original = ORM load (select key+active, pydantic JSON) + save "
            "(select key, update, commit), pg_original.py (its request building and answer "
            "parsing are not counted, which favours it); same Postgres server and database"
        ),
        **facts,
    }
    return make_result(
        NAME,
        METRIC,
        value=round(ours.median, 1),
        baseline=round(original.median, 1),
        goal=GOAL,
        unit="us",
        extra=extra,
    )


def run(quick: bool, snapshot: str | None = None) -> Result:
    plan = QUICK if quick else FULL
    states = agent_states(snapshot)
    samples, facts = _measure(plan, states)
    return _result(samples, plan, {**states.facts(), **facts})
