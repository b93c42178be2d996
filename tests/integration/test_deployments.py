"""Two deployments (two key prefixes) share one database: neither reads, reconciles, settles
or counts the other's sessions and ended owners, even when their IDs are the same."""

from __future__ import annotations

import redis

from agent_sessions.lifecycle import SessionLifecycle
from cache.records import Owner, SessionStatus
from tests import factories as f
from tests.integration.support import make_ctx, rows_of
from tests.servers import Database
from workers.drain import drain
from workers.reconcile import reconcile_once, sweep_conversations


def test_a_reconciler_never_settles_another_deployments_runs(
    redis_client: redis.Redis, redis_url: str, migrated: Database
) -> None:
    """Before, a pool with ``ASC_KEY_PREFIX=asc-kill`` settled the ended runs of every prefix
    in the shared database and wrote its own markers for them."""
    ours = make_ctx(redis_url, migrated.url, key_prefix="asc-ours", reconcile_grace_s=0)
    theirs = make_ctx(redis_url, migrated.url, key_prefix="asc-theirs", reconcile_grace_s=0)
    run = Owner(f.TENANT, f.RUN)
    for ctx in (ours, theirs):
        ctx.cache.save(f.session_key(), f.session_write())
        assert drain(ctx, timeout_s=30).drained
    theirs.repo.record_end(run, "succeeded", check_after_s=0)
    assert reconcile_once(ours) == []
    assert sweep_conversations(ours).retired == 0
    assert ours.cache.owner_state(run).get("state") == "open"  # no end of theirs applied here
    assert ours.repo.end_of(run) is None and theirs.repo.end_of(run) is not None
    assert ours.repo.count_unsettled_owners() == 0 and theirs.repo.count_unsettled_owners() == 1
    assert [s.status for s in rows_of(ours.repo, f.TENANT, f.RUN)] == [SessionStatus.ACTIVE]
    (done,) = reconcile_once(theirs)
    assert done.moved_to_cleaning == 1
    assert SessionLifecycle(ours).enter(f.scope()).resumable  # ours goes on, untouched


def test_the_same_session_key_in_two_deployments_is_two_rows(
    redis_client: redis.Redis, redis_url: str, migrated: Database
) -> None:
    ours = make_ctx(redis_url, migrated.url, key_prefix="asc-ours")
    theirs = make_ctx(redis_url, migrated.url, key_prefix="asc-theirs")
    key = f.session_key()
    for ctx, state in ((ours, "ours"), (theirs, "theirs")):
        ctx.cache.save(key, f.session_write(f.snapshot(state={"who": state})))
        ctx.cache.save(key, f.session_write(f.snapshot(state={"who": state})))
        report = drain(ctx, timeout_s=30)
        assert report.drained and report.written == 1 and report.parked == 0
    for ctx, state in ((ours, "ours"), (theirs, "theirs")):
        found = ctx.repo.get(key)
        assert found is not None and found.snapshot.layers[0].runtime_state == {"who": state}
    assert ours.repo.count_by_status() == {"active": 1}
