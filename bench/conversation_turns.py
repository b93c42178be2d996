"""conversation_turns: one chat turn of an Agent App conversation, ours against the original.

A turn is what a conversation costs between two backend runs, through the real path, with
only the backend's own time left out: **ours** = ``SessionLifecycle.enter(ConversationScope)``,
``build_request`` and its JSON encoding, the backend's answer decoded from its JSON bytes (an
~8 KB agent state), ``RunOutcome.from_status`` and ``finish``, with a real ``agent-sessions
worker`` pool flushing to Postgres in the background. **original** = the Postgres-only
``AgentAppRuntimeSessionStore`` (:class:`bench.pg_original.OriginalConversationStore`): load
the active row by ``(tenant, conversation, agent, config)`` (pydantic JSON decode), then read
by key, update in place and commit. Both arms use the same Postgres server and database and
the same conversations (200, one agent each, turns in random order), in alternating blocks,
saving the same states in the same order: :mod:`bench.agent_state`'s (``--snapshot
realistic``, the default, a new state each turn; ``--snapshot small``, the one of before).

Each turn has a new message id (a new ``ConversationScope``, validated at the door), as a
chat does; the scopes are built before timing.

Also timed in the same blocks (``extra``): **raw**, the floor of any Redis-backed turn on this
machine (``hot_path``'s raw arm, redis-py ``HGETALL`` + ``EVALSHA`` of a two-command save
script, on copies of ours' session hashes). ``floor_ratio`` = raw / original is the best
``ratio`` any implementation could report here.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import redis

from agent_backend.models import decode_status, encode_json
from bench.agent_state import AgentStates, agent_states
from bench.harness import (
    Result,
    make_result,
    ours_vs_original_facts,
    ours_vs_original_progress,
    private_redis,
    run_interleaved,
)
from bench.hot_path import RawLoop, seeded_uuid
from bench.loop_vs_postgres import Payloads
from bench.pg_original import OriginalConversationStore, create_engine, create_table
from bench.stack import bench_settings, migrated_database, worker_context, worker_pool
from cache.records import ConversationScope

if TYPE_CHECKING:
    from agent_sessions.lifecycle import SessionLifecycle
    from workers.context import WorkerContext

NAME = "conversation_turns"
METRIC = "per-turn time (enter+finish, 8 KB) vs Postgres-only original"
GOAL = "<= 0.15"
WORKERS = 2


@dataclass(frozen=True)
class Plan:
    conversations: int
    blocks: int
    per_block: int
    warmup: int


QUICK = Plan(conversations=100, blocks=4, per_block=150, warmup=50)
FULL = Plan(conversations=200, blocks=8, per_block=800, warmup=200)


@dataclass(frozen=True)
class ChatWorkload:
    """Conversations and payloads; both arms take the same turns in the same order."""

    conversations: list[ConversationScope]
    order: list[int]
    payloads: Payloads

    @classmethod
    def build(cls, conversations: int, seed: int, states: AgentStates) -> ChatWorkload:
        rng = random.Random(seed)
        tenant, app, binding, agent, config = (seeded_uuid(rng) for _ in range(5))
        scopes = [
            ConversationScope(tenant, app, seeded_uuid(rng), binding, agent, config, "message-0")
            for _ in range(conversations)
        ]
        order = list(range(conversations))
        random.Random(seed + 1).shuffle(order)
        return cls(scopes, order, Payloads.build(states))

    def turns(self, count: int) -> Iterator[ConversationScope]:
        """``count`` turns, each with its own message id (built before timing)."""
        made: list[ConversationScope] = []
        turn = 0
        while len(made) < count:
            turn += 1
            for i in self.order:
                made.append(replace(self.conversations[i], message_id=f"message-{turn}"))
        return iter(made[:count])


def ours_turn(
    lifecycle: SessionLifecycle, workload: ChatWorkload, turns: Iterator[ConversationScope]
) -> Callable[[], object]:
    from agent_sessions.outcomes import RunOutcome

    composition = workload.payloads.composition
    answers = itertools.cycle(workload.payloads.answers)

    def turn() -> object:
        scope = next(turns)
        entry = lifecycle.enter(scope)
        request = lifecycle.build_request(scope, entry, composition)
        encode_json(request)
        status = decode_status(next(answers))
        result = lifecycle.finish(scope, entry, RunOutcome.from_status(request, status))
        if result.version is None:
            raise RuntimeError(f"save failed: {result.metadata}")
        return result

    return turn


def original_turn(
    store: OriginalConversationStore, workload: ChatWorkload, turns: Iterator[ConversationScope]
) -> Callable[[], object]:
    backend_run_id = str(uuid.uuid4())
    snapshots = itertools.cycle(workload.payloads.originals)

    def turn() -> object:
        scope = next(turns)
        store.load(scope)
        store.save(scope, backend_run_id=backend_run_id, snapshot=next(snapshots))
        return None

    return turn


def _measure(plan: Plan, states: AgentStates) -> tuple[dict[str, list[list[int]]], dict[str, Any]]:
    from agent_sessions.lifecycle import SessionLifecycle

    workload = ChatWorkload.build(plan.conversations, seed=29, states=states)
    total = plan.conversations + plan.warmup + plan.blocks * plan.per_block
    with ExitStack() as stack:
        redis_url = stack.enter_context(private_redis())
        db_url = stack.enter_context(migrated_database())
        settings = bench_settings(redis_url, db_url)
        create_table(db_url)
        stack.enter_context(worker_pool(settings, WORKERS))
        ctx = stack.enter_context(worker_context(settings))
        engine = create_engine(db_url)
        stack.callback(engine.dispose)
        arms: dict[str, Callable[[], object]] = {
            "ours": ours_turn(SessionLifecycle(ctx), workload, workload.turns(total)),
            "original": original_turn(
                OriginalConversationStore(engine), workload, workload.turns(total)
            ),
        }
        for _ in range(plan.conversations):  # every conversation has a session
            for arm in arms.values():
                arm()
        arms["raw"] = _raw(ctx, workload)
        before = ctx.cache.counters().get("rows_flushed", 0)
        print(f"  {plan.conversations} conversations, {WORKERS} flush workers; timing…")
        samples = run_interleaved(
            arms,
            blocks=plan.blocks,
            per_block=plan.per_block,
            warmup=plan.warmup,
            on_block=ours_vs_original_progress(plan.blocks),
        )
        flushed = ctx.cache.counters().get("rows_flushed", 0) - before
    return samples, {"rows_flushed_meanwhile": flushed, "flush_workers": WORKERS}


def _raw(ctx: WorkerContext, workload: ChatWorkload) -> RawLoop:
    """The raw floor over copies of the conversations' session hashes, saving the same
    states."""
    names = [ctx.cache.keys.session(scope.key) for scope in workload.conversations]
    client = cast(redis.Redis, ctx.cache.client)
    raw = RawLoop(client, names, workload.order, workload.payloads.stored)
    raw.populate()
    return raw


def _result(samples: Mapping[str, list[list[int]]], plan: Plan, facts: dict[str, Any]) -> Result:
    ours, original, extra = ours_vs_original_facts(samples)
    extra |= {
        "turns_per_arm": ours.count,
        "conversations": plan.conversations,
        "blocks": plan.blocks,
        "per_block": plan.per_block,
        "what": (
            "ours = enter(ConversationScope), build_request + its JSON, the backend answer's "
            "JSON decoded, RunOutcome.from_status, finish(succeeded), with a worker pool "
            "flushing in the background; original = AgentAppRuntimeSessionStore's ORM load "
            "(select key+active, pydantic JSON) + save (select key, update, commit), "
            "pg_original.py (its request building and answer parsing are not counted, which "
            "favours it); raw = redis-py HGETALL + EVALSHA on copies of ours' hashes; same "
            "Postgres server and database"
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
