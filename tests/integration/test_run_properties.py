"""Property: whatever Redis loses and whenever, the run's end and every save's history hold.

Hypothesis drives random interleavings of node entries and exits (succeeded, paused, failed,
with entries held open across other steps), workflow ends, evictions of keys that have a TTL
(what ``volatile-*`` may evict), Redis losing everything (a restart without persistence),
Redis going back in time (a restart from a snapshot it took earlier: what an AOF that lost
its last writes, or a failover to a replica that missed them, leaves), flushes,
reconciliation passes and cleanup jobs, over four sessions in two runs, against a private
redis-server and Postgres. After every step, and after a final drain, reconcile and
clean-up:

* no session of an ended run is resumable, and no save into it is ever acknowledged;
* every session of an ended run is ``cleaned`` in Redis and Postgres, and the run is settled;
* Postgres never holds a snapshot that no acknowledged save produced;
* a flush never acknowledges a version Postgres holds as another save: whenever it marks a
  session clean, Postgres holds exactly that version and content.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable

import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from agent_backend.models import CreateRunRequest
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.outcomes import Entry, RunOutcome
from cache.records import Owner, Scope, SessionKey, SessionStatus, StoredSession
from tests import factories as f
from tests.integration.support import make_ctx, node_composition
from tests.servers import Database, RedisServer
from workers.cleanup import Cleaner
from workers.context import WorkerContext
from workers.drain import drain
from workers.reconcile import reconcile_once

RUNS = ("run-a", "run-b")
SCOPES = [f.scope(run=run, node=node) for run in RUNS for node in ("node-1", "node-2")]
REQUEST = CreateRunRequest(composition=node_composition())
scope_index = st.integers(min_value=0, max_value=len(SCOPES) - 1)


def key_of(scope: Scope) -> SessionKey:
    assert scope.key is not None
    return scope.key


class LosingRedis(RuleBasedStateMachine):
    """The model: which runs ended, which snapshots were acknowledged, which entries are open."""

    def __init__(self, ctx: WorkerContext, db_url: str, server: RedisServer) -> None:
        super().__init__()
        self.ctx, self.db_url, self.server = ctx, db_url, server
        self.entered_before_rollback: set[int] = set()
        self.lc = SessionLifecycle(ctx)
        self.ended: set[str] = set()
        self.acked: dict[SessionKey, set[str]] = defaultdict(set)
        self.open_entries: dict[int, Entry] = {}
        self.marks = itertools.count()
        self.violations: list[str] = []

    # --- the node ----------------------------------------------------------------------

    @rule(i=scope_index)
    def enter(self, i: int) -> None:
        self.open_entries[i] = self.lc.enter(SCOPES[i])
        self.entered_before_rollback.discard(i)

    @rule(i=scope_index, status=st.sampled_from(["succeeded", "paused", "failed"]))
    def finish(self, i: int, status: str) -> None:
        scope = SCOPES[i]
        entry = self.open_entries.pop(i, None) or self.lc.enter(scope)
        mark = f"{scope.node_id}@{scope.workflow_run_id}#{next(self.marks)}"
        snapshot = f.snapshot(state={"mark": mark})
        outcome = RunOutcome(status, f"backend-{mark}", REQUEST, snapshot)  # type: ignore[arg-type]
        result = self.lc.finish(scope, entry, outcome)
        persisted = result.metadata.get("session_snapshot_persisted") is True
        stale = i in self.entered_before_rollback
        self.entered_before_rollback.discard(i)
        if persisted and status != "failed":
            self.acked[key_of(scope)].add(mark)
            if scope.workflow_run_id in self.ended and not stale:
                self.violations.append(f"a save into ended {scope.workflow_run_id} was acked")

    @rule(run=st.sampled_from(RUNS))
    def end(self, run: str) -> None:
        self.lc.workflow_ended(f.TENANT, run, "succeeded")
        self.ended.add(run)

    # --- Redis losing things -------------------------------------------------------------

    @rule(pick=st.integers(min_value=0, max_value=1000))
    def evict_a_key_with_a_ttl(self, pick: int) -> None:
        client = self.ctx.cache.client
        volatile = sorted(k for k in client.scan_iter("asc:*") if int(client.pttl(k)) > 0)  # type: ignore[arg-type]
        if volatile:
            client.delete(volatile[pick % len(volatile)])

    @rule()
    def redis_loses_everything(self) -> None:
        client = self.ctx.cache.client
        client.flushall()
        client.script_flush()

    @rule()
    def redis_takes_a_snapshot(self) -> None:
        self.ctx.cache.client.save()

    @rule()
    def redis_goes_back_to_its_snapshot(self) -> None:
        """A crash and a restart from the last snapshot: everything since is gone. A node
        that entered before it and finishes after may still save into an owner that ended
        in between, unseen (README, Durability): its entries are marked so."""
        self.server.kill()
        self.server.start()
        self.entered_before_rollback |= set(self.open_entries)

    @rule(i=scope_index)
    def a_flushed_save_is_lost_when_redis_goes_back(self, i: int) -> None:
        """What an AOF that lost its last second does to a loop: the last save reached
        Postgres (and was acknowledged) and is gone from Redis; the loop goes on from the
        older state and the next flush meets what Postgres holds."""
        self.redis_takes_a_snapshot()
        self.finish(i, "succeeded")
        self.flush()
        self.redis_goes_back_to_its_snapshot()
        self.finish(i, "succeeded")
        self.flush()

    # --- the workers -------------------------------------------------------------------

    @rule()
    def flush(self) -> None:
        before = self._clean_versions()
        assert drain(self.ctx, timeout_s=10).drained
        for key, (version, content) in self._clean_versions().items():
            if before.get(key) == (version, content):
                continue  # clean before this flush: not its acknowledgement
            found = self.ctx.repo.get(key)
            held = None if found is None else (found.version, found.content_id)
            assert held == (version, content), f"{key}: acked v{version} {content}, pg {held}"

    def _clean_versions(self) -> dict[SessionKey, tuple[int, str | None]]:
        """Sessions Redis holds as flushed (acknowledged), with their version and content."""
        clean = {}
        for scope in SCOPES:
            record = self.ctx.cache.load(key_of(scope)).record
            if record is not None and not record.dirty:
                clean[key_of(scope)] = (record.version, record.content_id)
        return clean

    @rule()
    def reconcile(self) -> None:
        reconcile_once(self.ctx)

    @rule()
    def cleanup_jobs(self) -> None:
        cleaner = Cleaner(self.ctx.cache, self.ctx.repo, None, 1)
        for scope in SCOPES:
            cleaner.clean(key_of(scope), last_attempt=True)

    # --- what must always hold -----------------------------------------------------------

    @rule(i=scope_index)
    def an_ended_run_is_not_resumable(self, i: int) -> None:
        scope = SCOPES[i]
        if scope.workflow_run_id in self.ended:
            assert not self.lc.enter(scope).resumable, f"{scope} resumable after its run ended"

    @invariant()
    def no_save_into_an_ended_run_was_acknowledged(self) -> None:
        assert not self.violations, self.violations

    def settle(self) -> None:
        """What the workers do eventually: flush, reconcile, clean up, until it holds still;
        and an operator: a session parked because Redis went back is dropped, so Postgres's
        copy wins (``poison drop``)."""
        for _ in range(3):
            assert drain(self.ctx, timeout_s=10).drained
            self._drop_parked()
            with psycopg.connect(self.db_url, autocommit=True) as conn:
                conn.execute("UPDATE agent_session_owners SET next_check_at = now()")
            reconcile_once(self.ctx)
            self.cleanup_jobs()
        assert drain(self.ctx, timeout_s=10).drained
        reconcile_once(self.ctx)

    def _drop_parked(self) -> None:
        cache = self.ctx.cache
        for shard in cache.poison_sizes(list(cache.keys.all_shards())):
            for name in cache.poison(shard):
                cache.drop_poisoned(name)

    def check_final(self) -> None:
        self.settle()
        for scope in SCOPES:
            key = key_of(scope)
            cached, row = self.ctx.cache.load(key).record, self.ctx.repo.get(key)
            if scope.workflow_run_id in self.ended:
                for record in (cached, row):
                    assert record is None or record.status is SessionStatus.CLEANED, record
            if row is not None:
                assert self._mark(row) in self.acked[key], f"{key}: unacknowledged snapshot"
        for run in self.ended:
            end = self.ctx.repo.end_of(Owner(f.TENANT, run))
            assert end is not None and end.settled, f"{run} not settled"

    @staticmethod
    def _mark(session: StoredSession) -> object:
        return session.snapshot.layers[0].runtime_state.get("mark")

    def teardown(self) -> None:
        self.check_final()


def test_runs_and_lineage_hold_whatever_redis_loses(migrated: Database) -> None:
    with RedisServer() as server:
        fresh = make_ctx(server.url, migrated.url, reconcile_grace_s=0, shards=2)

        def machine() -> LosingRedis:
            with server.client() as client:
                client.flushall()
                client.save()  # an empty snapshot: a step back never reaches a former example
            with psycopg.connect(migrated.url, autocommit=True) as conn:
                conn.execute("TRUNCATE agent_runtime_sessions, agent_session_owners")
            return LosingRedis(fresh, migrated.url, server)

        _run(machine)


def _run(machine: Callable[[], LosingRedis]) -> None:

    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=100,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            database=None,
        ),
    )


def test_an_ended_owner_settles_after_redis_went_back_behind_postgres(migrated: Database) -> None:
    """Found by the machine above: Redis goes back to a flushed, ``cleaned`` copy (v3) while
    Postgres holds a later ``active`` row (v4) of an owner that then ends. The reconciler
    must not take the stale copy for settled: it brings Redis up to Postgres's row, and the
    end cleans that."""
    with RedisServer() as server:
        ctx = make_ctx(server.url, migrated.url, reconcile_grace_s=0, shards=2)
        with server.client() as client:
            client.flushall()
            client.save()
        machine = LosingRedis(ctx, migrated.url, server)
        machine.a_flushed_save_is_lost_when_redis_goes_back(i=3)
        machine.finish(i=3, status="failed")  # v3 cleaned, flushed
        machine.flush()
        machine.a_flushed_save_is_lost_when_redis_goes_back(i=3)  # Postgres: v4 active
        machine.end(run=SCOPES[3].workflow_run_id or "")
        machine.redis_goes_back_to_its_snapshot()  # Redis: v3 cleaned, clean
        machine.teardown()
