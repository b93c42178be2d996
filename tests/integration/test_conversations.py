"""Sessions of both owners: workflow runs and conversations, on standalone and cluster Redis.

The first part is one suite parametrised over the owner (a workflow run's node entries or a
conversation's turns) and the Redis (standalone, or a 3-primary cluster with RQ on a
standalone server): the lifecycle rules, write-behind, the fence, read-through, poison and
the owner's end run through the same scripts and the same code for both. The second part is
what only conversations have: the config snapshot as a compatibility scope, idle expiry and
an explicit end. Every claim about Postgres is checked after a real flush.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import psycopg
import pytest
import redis

from agent_backend.client import AgentBackendClient
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.outcomes import EndReport
from agent_sessions.testing.fake_backend import FakeAgentBackend
from cache.errors import InvalidInput
from cache.records import (
    ClosedBy,
    ConversationScope,
    Owner,
    OwnerType,
    Scope,
    SessionKey,
    SessionStatus,
)
from tests import factories as f
from tests.integration.support import (
    make_ctx,
    pg_status,
    redis_status,
    row,
    run_node,
    stored,
    upsert,
    wait_for,
)
from tests.servers import Database, RedisCluster
from workers.cleanup import Cleaner, cleanup_idempotency_key, retirement_of
from workers.context import WorkerContext
from workers.drain import drain
from workers.reconcile import reconcile_once, redis_now, sweep_conversations

TENANT = "tenant-1"
OWNER_ID = "owner-1"


@dataclass(frozen=True)
class OwnerCase:
    """How a test drives one owner: its entries' scopes, its key and its end."""

    kind: OwnerType

    def scope(self, entry: int, *, config: str = "config-1") -> Scope | ConversationScope:
        if self.kind is OwnerType.WORKFLOW_RUN:
            return f.scope(run=OWNER_ID, node_execution=f"exec-{entry}")
        return f.conversation_scope(
            tenant=TENANT, conversation=OWNER_ID, config=config, message=f"message-{entry}"
        )

    def key(self, *, config: str = "config-1") -> SessionKey:
        key = self.scope(0, config=config).key
        assert key is not None
        return key

    @property
    def ref(self) -> Owner:
        return self.key().owner

    def end(self, lc: SessionLifecycle) -> EndReport:
        if self.kind is OwnerType.WORKFLOW_RUN:
            return lc.workflow_ended(TENANT, OWNER_ID, "succeeded")
        return lc.conversation_ended(TENANT, OWNER_ID)


CONVERSATION = OwnerCase(OwnerType.CONVERSATION)


@pytest.fixture(params=list(OwnerType), ids=[t.value for t in OwnerType])
def owner(request: pytest.FixtureRequest) -> OwnerCase:
    return OwnerCase(request.param)


def _context(
    request: pytest.FixtureRequest,
    redis_url: str,
    database_url: str,
    fake: FakeAgentBackend,
    **overrides: object,
) -> WorkerContext:
    """A context on the Redis ``request.param`` names: standalone, or the private cluster
    (flushed for the test) with RQ on the standalone server."""
    options: dict[str, object] = {"agent_backend_url": fake.url, "cleanup_wait_s": 10}
    options |= overrides
    if request.param == "standalone":
        return make_ctx(redis_url, database_url, **options)
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    request.getfixturevalue("cluster_client")
    options |= {"redis_cluster": True, "rq_redis_url": redis_url}
    return make_ctx(cluster.url, database_url, **options)


@pytest.fixture(params=["standalone", "cluster"])
def ctx(
    request: pytest.FixtureRequest,
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    fake: FakeAgentBackend,
) -> WorkerContext:
    return _context(request, redis_url, migrated.url, fake)


@pytest.fixture(params=["standalone", "cluster"])
def idle_ctx(
    request: pytest.FixtureRequest,
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    fake: FakeAgentBackend,
) -> WorkerContext:
    """A context whose conversations go idle after one second."""
    return _context(request, redis_url, migrated.url, fake, conversation_idle_s=1.0)


@pytest.fixture
def lc(ctx: WorkerContext) -> Iterator[SessionLifecycle]:
    yield SessionLifecycle(ctx)


def idle(ctx: WorkerContext, key: SessionKey) -> None:
    """Wait until ``key``'s last save is ``conversation_idle_s`` old by Redis's clock, the
    clock the sweep asks Postgres and Redis with."""

    def listed() -> bool:
        before = redis_now(ctx) - timedelta(seconds=ctx.settings.conversation_idle_s)
        return key in ctx.repo.idle_conversation_keys(before=before, limit=100)

    wait_for(listed, f"{key} to be idle", 10)


def flushed(ctx: WorkerContext) -> None:
    report = drain(ctx, timeout_s=30)
    assert report.drained and report.poisoned == 0


def clean(ctx: WorkerContext, backend: AgentBackendClient, key: SessionKey) -> str:
    """Run the key's cleanup job body once (as a worker would); its outcome."""
    return Cleaner(ctx.cache, ctx.repo, backend, 10).clean(key, last_attempt=True).outcome


def lose_everything(ctx: WorkerContext) -> None:
    """Redis restarted without persistence (every key of every node gone)."""
    client = ctx.cache.client
    if isinstance(client, redis.RedisCluster):
        client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    else:
        client.flushall()


def owner_columns(ctx: WorkerContext, key: SessionKey) -> tuple[object, ...]:
    url = ctx.settings.database_url
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT owner_type, workflow_run_id, conversation_id, node_id, binding_id,"
            " agent_id, agent_config_snapshot_id FROM agent_runtime_sessions"
            " WHERE tenant_id = %s",
            (key.tenant_id,),
        ).fetchall()
    assert len(found) == 1, found
    return tuple(found[0])


# ------------------------------------------------------------------ 1. one suite, both owners


def test_an_entry_resumes_the_last_one_and_postgres_gets_the_owners_columns(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, owner: OwnerCase
) -> None:
    first = run_node(lc, backend, owner.scope(1))
    assert not first.entry.resumable and first.result.version == 1
    second = run_node(lc, backend, owner.scope(2))
    assert second.entry.resumable and second.entry.version == 1
    assert second.request.session_snapshot == first.status.session_snapshot
    purpose = "agent_app" if owner.kind is OwnerType.CONVERSATION else "workflow_node"
    assert second.request.purpose == purpose
    turn = "message-2" if owner.kind is OwnerType.CONVERSATION else "exec-2"
    assert second.request.idempotency_key == f"{OWNER_ID}:{turn}"

    name = ctx.cache.keys.session(owner.key())
    word = "conversation-session" if owner.kind is OwnerType.CONVERSATION else "session"
    assert name.split(":")[2] == word  # the key says its owner in redis-cli
    flushed(ctx)
    saved = row(ctx, owner.key())
    assert saved.status is SessionStatus.ACTIVE and saved.version == 2
    assert saved.snapshot == stored(ctx, owner.key()).snapshot
    if owner.kind is OwnerType.CONVERSATION:
        expected = ("conversation", None, OWNER_ID, None, "binding-1", "agent-1", "config-1")
    else:
        expected = ("workflow_run", OWNER_ID, None, "node-1", "binding-1", "agent-1", "config-1")
    assert owner_columns(ctx, owner.key()) == expected


def test_a_failed_run_retires_the_session_and_the_next_entry_starts_fresh(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, owner: OwnerCase
) -> None:
    run_node(lc, backend, owner.scope(1))
    failed = run_node(lc, backend, owner.scope(2), behaviour="fail")
    assert failed.result.status == "failed"
    assert failed.result.metadata["session_snapshot_cleaned_on_failure"] is True
    assert not lc.enter(owner.scope(3)).resumable
    flushed(ctx)
    retired = row(ctx, owner.key())
    assert retired.status is SessionStatus.CLEANED
    assert retired.closed_by is ClosedBy.BACKEND_FAILURE
    again = run_node(lc, backend, owner.scope(4))  # a new conversation with the agent
    assert again.result.version == 3 and lc.enter(owner.scope(5)).resumable


def test_a_pause_is_a_workflow_level_pause_and_is_flushed_urgently(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, owner: OwnerCase
) -> None:
    paused = run_node(lc, backend, owner.scope(1), behaviour="human_input", pending_form_id="f-1")
    assert paused.result.status == "paused" and paused.result.pause is not None
    assert paused.result.pause.human_input and paused.result.pause.pending_form_id == "f-1"
    assert paused.result.metadata["session_flush"] in ("enqueued", "pending")
    entry = lc.enter(owner.scope(2))
    assert entry.resumable and entry.pending_form_id == "f-1"
    flushed(ctx)
    saved = row(ctx, owner.key())
    assert saved.version == 1 and saved.data.pending_form_id == "f-1"
    assert saved.data.pending_tool_call_id == entry.pending_tool_call_id is not None


def test_read_through_brings_back_a_flushed_session_redis_lost(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, owner: OwnerCase
) -> None:
    first = run_node(lc, backend, owner.scope(1))
    flushed(ctx)
    lose_everything(ctx)
    entry = lc.enter(owner.scope(2))
    assert entry.resumable and entry.version == 1
    assert entry.snapshot == first.status.session_snapshot
    second = run_node(lc, backend, owner.scope(2), entry=entry)
    assert second.result.version == 2  # the version never restarts
    flushed(ctx)
    assert row(ctx, owner.key()).version == 2


def test_postgres_ahead_of_redis_is_parked_in_poison_never_acked(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, owner: OwnerCase
) -> None:
    run_node(lc, backend, owner.scope(1))
    flushed(ctx)
    ahead = stored(ctx, owner.key())
    upsert(ctx.repo, [_with_version(ahead, 9)])
    run_node(lc, backend, owner.scope(2))  # Redis: version 2; Postgres holds 9
    report = drain(ctx, timeout_s=30)
    assert report.poisoned == 1
    shard = ctx.cache.keys.shard_of_key(owner.key())
    (reason,) = ctx.cache.poison(shard).values()
    assert reason.startswith("v2: ") and "ahead" in reason
    assert row(ctx, owner.key()).version == 9


def _with_version(session: object, version: int) -> object:
    import dataclasses

    return dataclasses.replace(session, version=version, flushed_version=version)  # type: ignore[type-var]


def test_the_owners_end_cleans_every_session_on_the_backend_and_refuses_later_saves(
    ctx: WorkerContext,
    lc: SessionLifecycle,
    backend: AgentBackendClient,
    fake: FakeAgentBackend,
    owner: OwnerCase,
) -> None:
    last = run_node(lc, backend, owner.scope(1))
    report = owner.end(lc)
    assert (report.sessions, report.moved_to_cleaning, report.cleanups_enqueued) == (1, 1, 1)
    cleaning = stored(ctx, owner.key())
    assert cleaning.status is SessionStatus.CLEANING
    assert not lc.enter(owner.scope(2)).resumable
    assert clean(ctx, backend, owner.key()) == "cleaned"

    (cleanup,) = [r for r in fake.runs() if r.is_cleanup]
    retirement = retirement_of(cleaning)
    assert cleanup.request.idempotency_key == cleanup_idempotency_key(
        owner.key(), retirement=retirement
    )
    assert cleanup.request.on_exit.default == "delete"
    assert cleanup.request.metadata["previous_agent_backend_run_id"] == last.status.run_id
    assert cleanup.request.metadata["owner_type"] == owner.kind.value
    assert cleanup.status == "succeeded"

    late = run_node(lc, backend, owner.scope(3))
    assert late.result.metadata["session_snapshot_persisted"] is False
    flushed(ctx)
    for record in (stored(ctx, owner.key()), row(ctx, owner.key())):
        assert record.status is SessionStatus.CLEANED
        assert record.closed_by is owner.kind.end_closer
    wait_for(lambda: reconcile_settles(ctx, owner), "the owner settled", 30)


def reconcile_settles(ctx: WorkerContext, owner: OwnerCase) -> bool:
    with psycopg.connect(ctx.settings.database_url) as conn:
        conn.execute("UPDATE agent_session_owners SET next_check_at = now()")
    reconcile_once(ctx)
    end = ctx.repo.end_of(owner.ref)
    return end is not None and end.settled


def test_an_end_after_redis_lost_everything_still_cleans_and_stays_ended(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, owner: OwnerCase
) -> None:
    run_node(lc, backend, owner.scope(1))
    flushed(ctx)
    lose_everything(ctx)
    report = owner.end(lc)
    assert report.moved_to_cleaning == 1  # filled back from Postgres, then stopped
    assert clean(ctx, backend, owner.key()) == "cleaned"
    lose_everything(ctx)  # again, before "cleaned" reached Postgres: the end is Postgres's fact
    assert not lc.enter(owner.scope(2)).resumable
    assert pg_status(ctx, owner.key()) is SessionStatus.ACTIVE  # what Postgres last heard
    assert redis_status(ctx, owner.key()) is SessionStatus.CLEANING  # never active again
    late = run_node(lc, backend, owner.scope(2))
    assert late.result.metadata["session_snapshot_persisted"] is False
    with psycopg.connect(ctx.settings.database_url) as conn:
        conn.execute("UPDATE agent_session_owners SET next_check_at = now()")
    (done,) = reconcile_once(ctx)  # the reconciler has the backend clean it up again
    assert done.moved_to_cleaning == 0 and done.cleanups_requested <= 1
    assert clean(ctx, backend, owner.key()) == "cleaned"
    flushed(ctx)
    assert pg_status(ctx, owner.key()) is SessionStatus.CLEANED


# ------------------------------------------------------------- 2. what conversations add


def test_a_turn_with_another_config_starts_fresh_and_retires_the_old_session(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient, fake: FakeAgentBackend
) -> None:
    old, new = CONVERSATION.key(config="config-1"), CONVERSATION.key(config="config-2")
    run_node(lc, backend, CONVERSATION.scope(1, config="config-1"))
    run_node(lc, backend, CONVERSATION.scope(2, config="config-1"))
    entry = lc.enter(CONVERSATION.scope(3, config="config-2"))
    assert not entry.resumable  # never an incompatible snapshot
    record = stored(ctx, old)
    assert record.status is SessionStatus.CLEANING
    assert record.closed_by is ClosedBy.CONFIG_CHANGE
    assert clean(ctx, backend, old) == "cleaned"
    (cleanup,) = [r for r in fake.runs() if r.is_cleanup]
    assert cleanup.request.metadata["agent_config_snapshot_id"] == "config-1"

    done = run_node(lc, backend, CONVERSATION.scope(3, config="config-2"), entry=entry)
    assert done.result.version == 1
    assert lc.enter(CONVERSATION.scope(4, config="config-2")).resumable
    flushed(ctx)
    assert pg_status(ctx, old) is SessionStatus.CLEANED
    assert row(ctx, old).closed_by is ClosedBy.CONFIG_CHANGE
    assert pg_status(ctx, new) is SessionStatus.ACTIVE
    # going back to config-1 starts fresh too (its session was retired), and retires config-2
    back = run_node(lc, backend, CONVERSATION.scope(5, config="config-1"))
    assert not back.entry.resumable and back.result.version == 5  # 2 saves, cleaning, cleaned
    assert redis_status(ctx, new) is SessionStatus.CLEANING


def test_a_config_change_after_redis_lost_everything_still_retires_the_old_session(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    old = CONVERSATION.key(config="config-1")
    run_node(lc, backend, CONVERSATION.scope(1, config="config-1"))
    flushed(ctx)
    lose_everything(ctx)  # the owner hash that named config-1 is gone too
    assert not lc.enter(CONVERSATION.scope(2, config="config-2")).resumable
    assert redis_status(ctx, old) is SessionStatus.CLEANING  # Postgres named it
    assert clean(ctx, backend, old) == "cleaned"
    flushed(ctx)
    assert pg_status(ctx, old) is SessionStatus.CLEANED


def test_an_idle_conversation_is_retired_and_cleaned_and_its_next_turn_starts_fresh(
    idle_ctx: WorkerContext, backend: AgentBackendClient
) -> None:
    ctx, lc = idle_ctx, SessionLifecycle(idle_ctx)
    key = CONVERSATION.key()
    busy = OwnerCase(OwnerType.CONVERSATION)
    run_node(lc, backend, busy.scope(1))
    flushed(ctx)
    assert sweep_conversations(ctx).retired == 0  # not idle yet
    idle(ctx, key)
    swept = sweep_conversations(ctx)
    assert (swept.retired, swept.cleanups_requested) == (1, 1)
    record = stored(ctx, key)
    assert record.status is SessionStatus.CLEANING and record.closed_by is ClosedBy.IDLE
    assert clean(ctx, backend, key) == "cleaned"
    assert not lc.enter(busy.scope(2)).resumable
    again = run_node(lc, backend, busy.scope(2))  # the conversation did not end
    assert again.result.metadata["session_snapshot_persisted"] is True
    assert lc.enter(busy.scope(3)).resumable
    flushed(ctx)
    assert pg_status(ctx, key) is SessionStatus.ACTIVE


def test_idle_expiry_after_redis_lost_everything_still_retires_and_cleans(
    idle_ctx: WorkerContext, backend: AgentBackendClient
) -> None:
    ctx, lc = idle_ctx, SessionLifecycle(idle_ctx)
    key = CONVERSATION.key()
    run_node(lc, backend, CONVERSATION.scope(1))
    flushed(ctx)
    lose_everything(ctx)
    idle(ctx, key)
    assert sweep_conversations(ctx).retired == 1  # filled back from Postgres, then retired
    assert stored(ctx, key).closed_by is ClosedBy.IDLE
    assert clean(ctx, backend, key) == "cleaned"
    flushed(ctx)
    assert pg_status(ctx, key) is SessionStatus.CLEANED
    assert sweep_conversations(ctx).retired == 0  # nothing twice


def test_a_save_after_the_idle_cutoff_in_redis_keeps_the_session(
    idle_ctx: WorkerContext, backend: AgentBackendClient
) -> None:
    """Postgres's ``updated_at`` may lag Redis by a flush: Redis has the last word."""
    ctx, lc = idle_ctx, SessionLifecycle(idle_ctx)
    run_node(lc, backend, CONVERSATION.scope(1))
    flushed(ctx)
    idle(ctx, CONVERSATION.key())
    run_node(lc, backend, CONVERSATION.scope(2))  # saved in Redis, not flushed yet
    before = redis_now(ctx) - timedelta(seconds=1)
    assert ctx.repo.idle_conversation_keys(before=before, limit=10) == [CONVERSATION.key()]
    assert sweep_conversations(ctx).retired == 0
    assert redis_status(ctx, CONVERSATION.key()) is SessionStatus.ACTIVE


def test_a_stalled_retirement_gets_its_cleanup_requested_again(
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    fake: FakeAgentBackend,
    backend: AgentBackendClient,
) -> None:
    ctx = make_ctx(redis_url, migrated.url, agent_backend_url=fake.url, reconcile_grace_s=0)
    lc = SessionLifecycle(ctx)
    old = CONVERSATION.key(config="config-1")
    run_node(lc, backend, CONVERSATION.scope(1, config="config-1"))
    lc.enter(CONVERSATION.scope(2, config="config-2"))  # retired, cleanup requested
    flushed(ctx)
    ctx.cleanup_queue.empty()  # the job was lost
    ctx.queue_redis.delete(*ctx.queue_redis.keys(f"{ctx.settings.key_prefix}:cleanup_pending:*"))
    assert pg_status(ctx, old) is SessionStatus.CLEANING
    assert sweep_conversations(ctx).cleanups_requested == 1
    assert len(ctx.cleanup_queue) == 1


def test_a_session_retired_twice_is_cleaned_up_twice_on_a_deduplicating_backend(
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
    backend: AgentBackendClient,
) -> None:
    """Idle, back again, idle again: each retirement has a cleanup key of its own, so a
    backend that dedupes keys never answers the second with the first one's run (whose
    layers are long gone) while the second life's layers stay alive."""
    with FakeAgentBackend(dedupe_failed=True) as fake, AgentBackendClient(fake.url) as client:
        ctx = make_ctx(redis_url, migrated.url, agent_backend_url=fake.url, conversation_idle_s=1.0)
        lc = SessionLifecycle(ctx)
        key = CONVERSATION.key()
        runs = []
        for life in (1, 2):
            run_node(lc, client, CONVERSATION.scope(life))
            flushed(ctx)
            idle(ctx, key)
            assert sweep_conversations(ctx).retired == 1
            assert clean(ctx, client, key) == "cleaned"
            runs.append(stored(ctx, key).data.backend_run_id)
        cleanups = [r for r in fake.runs() if r.is_cleanup]
        assert len(cleanups) == 2 and runs == [r.run_id for r in cleanups]
        first, second = (r.request.idempotency_key for r in cleanups)
        assert first != second
        assert all(r.status == "succeeded" for r in cleanups)
        assert stored(ctx, key).cleanup_error is None


def test_idle_expiry_leaves_a_session_saved_after_the_cutoff_or_waiting_for_a_human(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """The cutoff is checked inside ``begin_cleanup``: a save that lands between the sweep's
    reading and its retiring wins; a turn paused for human input is never idle."""
    key = CONVERSATION.key()
    run_node(lc, backend, CONVERSATION.scope(1))
    long = 10.0**9  # seconds: the session was saved since such a cutoff
    assert ctx.cache.begin_cleanup(key.owner, [key], closed_by=ClosedBy.IDLE, idle_s=long) == 0
    assert redis_status(ctx, key) is SessionStatus.ACTIVE
    run_node(lc, backend, CONVERSATION.scope(2), behaviour="human_input", pending_form_id="f-1")
    assert ctx.cache.begin_cleanup(key.owner, [key], closed_by=ClosedBy.IDLE, idle_s=0) == 0
    assert redis_status(ctx, key) is SessionStatus.ACTIVE
    flushed(ctx)
    assert ctx.repo.idle_conversation_keys(before=redis_now(ctx), limit=10) == []  # nor in PG


def test_an_owner_end_takes_only_its_owners_outcomes(
    ctx: WorkerContext, lc: SessionLifecycle
) -> None:
    with pytest.raises(InvalidInput, match="outcome"):
        ctx.repo.record_end(CONVERSATION.ref, "succeeded", check_after_s=60)
    with pytest.raises(InvalidInput, match="outcome"):
        lc.workflow_ended(TENANT, OWNER_ID, "ended")
    assert ctx.repo.end_of(CONVERSATION.ref) is None
    assert ctx.repo.end_of(Owner(TENANT, OWNER_ID)) is None


def test_conversations_and_workflow_runs_with_the_same_ids_never_meet(
    ctx: WorkerContext, lc: SessionLifecycle, backend: AgentBackendClient
) -> None:
    """A run id equal to a conversation id: two owners, two sessions, two rows."""
    workflow = OwnerCase(OwnerType.WORKFLOW_RUN)
    run_node(lc, backend, workflow.scope(1))
    run_node(lc, backend, CONVERSATION.scope(1))
    lc.conversation_ended(TENANT, OWNER_ID)
    assert lc.enter(workflow.scope(2)).resumable  # the run goes on
    flushed(ctx)
    assert pg_status(ctx, workflow.key()) is SessionStatus.ACTIVE
    assert pg_status(ctx, CONVERSATION.key()) is SessionStatus.CLEANING
    assert ctx.repo.end_of(workflow.ref) is None
