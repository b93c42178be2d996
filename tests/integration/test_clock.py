"""Redis is the only clock: every time a script stores comes from Redis's TIME, and the idle
sweep compares Redis times with Redis time, whatever the application host's clock says."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta

import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.scripts import prelude_line
from tests import factories as f
from tests.integration.support import make_ctx, settings_env
from tests.servers import Database
from workers.context import WorkerContext
from workers.drain import drain
from workers.reconcile import redis_now, sweep_conversations

YEAR_2100_MS = 4_102_444_800_000


@settings(max_examples=300, deadline=None)
@given(ms=st.integers(min_value=0, max_value=YEAR_2100_MS))
def test_the_scripts_iso_text_is_pythons(redis_url: str, ms: int) -> None:
    """``iso_of`` writes what ``datetime.isoformat(timespec="milliseconds")`` writes, so a
    time stamped by a script reads back, sorts and compares like one Python stamped."""
    client = redis.Redis.from_url(redis_url)
    with client:
        text = client.eval(f"{prelude_line()} return iso_of(tonumber(ARGV[1]))", 0, ms)
    expected = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    assert text.decode() == expected


SKEWED_APP = textwrap.dedent(
    """
    import datetime as _datetime, sys, time as _time
    skew = float(sys.argv[1])
    real_time = _time.time
    _time.time = lambda: real_time() + skew

    class Skewed(_datetime.datetime):
        __slots__ = ()

        @classmethod
        def now(cls, tz=None):
            return _datetime.datetime.fromtimestamp(real_time() + skew, tz)

    _datetime.datetime = Skewed

    from cache.records import ConversationScope, SessionWrite, Snapshot
    from cache.settings import Settings
    from workers.context import WorkerContext

    ctx = WorkerContext.from_settings(Settings())
    scope = ConversationScope(
        tenant_id="tenant-1", app_id="app-1", conversation_id="chat-1", binding_id="binding-1",
        agent_id="agent-1", agent_config_snapshot_id="config-1", message_id="m-1",
    )
    for turn in range(3):
        ctx.cache.save(scope.key, SessionWrite.for_scope(scope, Snapshot(layers=()), ()))
    ctx.close()
    """
)


def run_skewed_app(ctx: WorkerContext, skew_s: float) -> None:
    """Save a conversation's session three times from a process whose clock is off."""
    subprocess.run(
        [sys.executable, "-c", SKEWED_APP, str(skew_s)],
        env=settings_env(ctx),
        check=True,
        timeout=60,
    )


def test_an_application_with_a_clock_a_minute_behind_changes_nothing(
    redis_client: redis.Redis, redis_url: str, migrated: Database
) -> None:
    """Before, ``updated_at`` was the application's clock: with it 60 s behind and a 30 s
    idle window, every conversation session looked idle at once and was retired."""
    ctx = make_ctx(redis_url, migrated.url, conversation_idle_s=30)
    run_skewed_app(ctx, -60.0)
    key = f.conversation_scope(conversation="chat-1", config="config-1").key
    record = ctx.cache.load(key).record
    assert record is not None and record.version == 3 and record.updated_at is not None
    stamped = datetime.fromisoformat(record.updated_at)
    assert abs(stamped - redis_now(ctx)) < timedelta(seconds=10)  # Redis's time, not the app's
    assert drain(ctx, timeout_s=30).drained
    assert sweep_conversations(ctx).retired == 0
    after = ctx.cache.load(key).record
    assert after is not None and after.status.value == "active"
