"""One test per invariant of the hot store, on standalone Redis and on Redis Cluster.

The ``client`` fixture is parametrized, so every test body runs against both.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest

from cache.client import RedisClient
from cache.errors import (
    BacklogFull,
    ConfigurationError,
    CorruptValue,
    InvalidInput,
    PayloadTooLarge,
    RunEnded,
    VersionConflict,
)
from cache.records import SessionKey, SessionStatus, StoredSession
from cache.replies import Retired
from cache.settings import Settings
from cache.store import RedisSessionCache
from tests import factories as f

ACTIVE_TTL_S = 5000
CLEANED_TTL_S = 50
TTL_SLACK_MS = 60_000

MakeCache = Callable[..., RedisSessionCache]


@pytest.fixture(params=["standalone", "cluster"])
def client(request: pytest.FixtureRequest) -> RedisClient:
    name = "redis_client" if request.param == "standalone" else "cluster_client"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture
def make_cache(client: RedisClient) -> MakeCache:
    def make(**settings: Any) -> RedisSessionCache:
        defaults: dict[str, Any] = {"active_ttl_s": ACTIVE_TTL_S, "cleaned_ttl_s": CLEANED_TTL_S}
        return RedisSessionCache(client, Settings(**(defaults | settings)))

    return make


@pytest.fixture
def cache(make_cache: MakeCache) -> RedisSessionCache:
    return make_cache()


def name_of(cache: RedisSessionCache, key: SessionKey) -> str:
    return cache.keys.session(key)


def dirty_of(cache: RedisSessionCache, key: SessionKey) -> str:
    return cache.keys.dirty(cache.keys.shard_of_key(key))


def dirty_score(cache: RedisSessionCache, key: SessionKey) -> float | None:
    return cache.client.zscore(dirty_of(cache, key), name_of(cache, key))  # type: ignore[return-value]


def pttl(cache: RedisSessionCache, key: SessionKey) -> int:
    return int(cache.client.pttl(name_of(cache, key)))  # type: ignore[arg-type]


def ack(cache: RedisSessionCache, key: SessionKey, version: int) -> tuple[int, int]:
    acked = cache.ack_flush(cache.keys.shard_of_key(key), [(name_of(cache, key), version)])
    return acked.acked, acked.still_dirty


def keys_of_run(n: int, *, tenant: str = f.TENANT, run: str = f.RUN) -> list[SessionKey]:
    return [f.session_key(tenant=tenant, run=run, node=f"node-{i}") for i in range(n)]


def wait_for_next_ms(cache: RedisSessionCache, after_ms: float) -> None:
    """Poll Redis's clock (deadline 5 s) until it is past ``after_ms``."""
    deadline = time.monotonic() + 5
    while cache.server_time_ms() <= after_ms:
        assert time.monotonic() < deadline, "Redis clock did not advance"


@pytest.fixture(params=["workflow_run", "conversation"])
def key(request: pytest.FixtureRequest) -> SessionKey:
    """A session of each owner: every invariant below holds for both (the same scripts)."""
    if request.param == "conversation":
        return f.conversation_scope().key
    return f.session_key()


def ended(key: SessionKey, outcome: str) -> str:
    """``outcome`` for a workflow run's key; a conversation's only outcome otherwise."""
    return outcome if key.conversation_id is None else "ended"


# --- save -----------------------------------------------------------------------------


def test_save_bumps_version_by_one_and_keeps_first_dirty_time(
    cache: RedisSessionCache, key: SessionKey
) -> None:
    """Each save bumps the version by exactly one; the dirty score is the FIRST dirty time."""
    before = cache.server_time_ms()
    assert cache.save(key, f.session_write()) == 1
    first = dirty_score(cache, key)
    assert first is not None and before <= first <= cache.server_time_ms()
    wait_for_next_ms(cache, first)
    assert cache.save(key, f.session_write()) == 2
    assert cache.save(key, f.session_write()) == 3
    assert dirty_score(cache, key) == first
    loaded = cache.load(key)
    assert loaded.version == 3 and loaded.session is not None
    assert loaded.session.dirty and loaded.session.flushed_version == 0
    assert cache.owner_sessions(f.run_of(key)) == [key]


def test_dirty_session_has_no_ttl_and_gets_the_clean_ttl_once_acked(
    cache: RedisSessionCache, key: SessionKey
) -> None:
    """A dirty session never has a TTL; acking its current version sets active_ttl_s."""
    version = cache.save(key, f.session_write())
    assert pttl(cache, key) == -1
    assert ack(cache, key, version) == (1, 0)
    assert ACTIVE_TTL_S * 1000 - TTL_SLACK_MS < pttl(cache, key) <= ACTIVE_TTL_S * 1000
    assert dirty_score(cache, key) is None
    version = cache.save(key, f.session_write())  # dirty again: the TTL must go
    assert pttl(cache, key) == -1
    assert dirty_score(cache, key) is not None
    assert ack(cache, key, version) == (1, 0)
    assert pttl(cache, key) > CLEANED_TTL_S * 1000


def test_session_cleaned_at_workflow_end_gets_the_cleaned_ttl_once_acked(
    cache: RedisSessionCache, key: SessionKey
) -> None:
    """cleaning and cleaned are dirty (no TTL); a flushed workflow-end clean gets cleaned_ttl_s."""
    cache.save(key, f.session_write())
    ending = cache.end_owner(f.run_of(key), ended(key, "succeeded"))
    assert cache.begin_cleanup(f.run_of(key), ending.keys) == 1
    assert pttl(cache, key) == -1 and dirty_score(cache, key) is not None
    assert ack(cache, key, 2) == (1, 0)  # a flush of the cleaning state: clean, long TTL
    assert pttl(cache, key) > CLEANED_TTL_S * 1000
    version = cache.mark_cleaned(key, cleanup_run_id="cleanup-1")
    assert version == 3
    assert pttl(cache, key) == -1 and dirty_score(cache, key) is not None
    assert ack(cache, key, version) == (1, 0)
    assert 0 < pttl(cache, key) <= CLEANED_TTL_S * 1000
    assert dirty_score(cache, key) is None


# --- load -----------------------------------------------------------------------------


def test_load_never_returns_a_cleaned_or_cleaning_session_as_resumable(
    cache: RedisSessionCache,
) -> None:
    """Loaded.session is None for cleaned/cleaning; Loaded.version is still the stored one."""
    retired, ended = f.session_key(node="retired"), f.session_key(run="ended-run")
    assert cache.load(retired).session is None and cache.load(retired).version == 0
    cache.save(retired, f.session_write())
    assert cache.load(retired).session is not None
    assert cache.retire(retired, "failed-run") == Retired(2, SessionStatus.CLEANED)
    loaded = cache.load(retired)
    assert loaded.session is None and loaded.version == 2
    assert loaded.record is not None and loaded.record.status is SessionStatus.CLEANED
    assert loaded.record.data.backend_run_id == "failed-run"

    cache.save(ended, f.session_write())
    cache.begin_cleanup(f.run_of(ended), cache.end_owner(f.run_of(ended), "failed").keys)
    loaded = cache.load(ended)
    assert loaded.session is None and loaded.version == 2
    assert loaded.record is not None and loaded.record.status is SessionStatus.CLEANING
    cache.mark_cleaned(ended, error="backend unreachable")
    loaded = cache.load(ended)
    assert loaded.session is None and loaded.version == 3
    assert loaded.record is not None and loaded.record.cleanup_error == "backend unreachable"


# --- end_owner / begin_cleanup ----------------------------------------------------------


def test_after_end_run_every_save_is_refused_and_nothing_is_written(
    cache: RedisSessionCache, client: RedisClient
) -> None:
    """Once the run has ended no save lands: RunEnded, and Redis is byte-for-byte unchanged."""
    old, new = keys_of_run(2)
    cache.save(old, f.session_write())
    ended = cache.end_owner(f.run_of(old), "succeeded")
    assert ended.keys == (old,) and not ended.already_ended
    before = f.redis_state(client)
    for k, expected in [(old, None), (old, 1), (new, None), (new, 0)]:
        with pytest.raises(RunEnded):
            cache.save(k, f.session_write(), expected_version=expected)
    assert f.redis_state(client) == before
    assert cache.load(new).record is None
    assert cache.owner_state(f.run_of(old))["state"] == "ended"


def test_a_conversation_save_records_its_config_and_member_and_refuses_another_config(
    cache: RedisSessionCache, client: RedisClient
) -> None:
    """A conversation's session is saved under its key's config snapshot only; the save
    names that config in the conversation's hash and adds ``<binding>:<agent>:<config>`` to
    its set; a write of another config is refused with nothing written."""
    turn = f.conversation_scope(config="config-9")
    key = turn.key
    names = cache.keys.names(key)
    before = f.redis_state(client)
    with pytest.raises(InvalidInput, match="agent_config_snapshot_id"):
        cache.save(key, f.session_write())  # a write of config-1
    assert f.redis_state(client) == before
    assert cache.save(key, f.session_write(of=turn)) == 1
    assert client.hget(names.owner, "config:binding-1:agent-1") == b"config-9"
    assert client.smembers(names.owner_sessions) == {b"binding-1:agent-1:config-9"}
    loaded = cache.load(key)
    assert loaded.current_config == "config-9" and loaded.session is not None
    assert cache.end_owner(key.owner, "ended").keys == (key,)
    with pytest.raises(InvalidInput, match="outcome"):
        cache.end_owner(key.owner, "succeeded")  # a workflow's outcome, not a conversation's


def test_a_workflow_runs_save_without_its_workflow_ids_is_refused_with_nothing_written(
    cache: RedisSessionCache, client: RedisClient
) -> None:
    """A workflow run's session names its workflow and node execution (Postgres's CHECK
    requires them): a write without them is InvalidInput at the door, not a session the next
    entry cannot read."""
    before = f.redis_state(client)
    for field in ("workflow_id", "node_execution_id"):
        write = dataclasses.replace(f.session_write(), **{field: None})
        with pytest.raises(InvalidInput, match=field):
            cache.save(f.session_key(), write)
    assert f.redis_state(client) == before
    chat = f.conversation_scope()
    assert f.session_write(of=chat).workflow_id is None  # a conversation's has none
    assert cache.save(chat.key, f.session_write(of=chat)) == 1


def test_end_run_of_a_run_that_never_saved_still_refuses_later_saves(
    cache: RedisSessionCache, key: SessionKey
) -> None:
    """end_owner before any save leaves an ended marker that refuses the first save."""
    ending = cache.end_owner(f.run_of(key), ended(key, "aborted"))
    assert ending.keys == () and not ending.already_ended
    with pytest.raises(RunEnded):
        cache.save(key, f.session_write())
    assert cache.load(key).record is None


def test_begin_cleanup_leaves_no_active_session_of_the_run(cache: RedisSessionCache) -> None:
    """After end_owner + begin_cleanup every session of the run is cleaning or cleaned."""
    keys = keys_of_run(5)
    for k in keys:
        cache.save(k, f.session_write())
    cache.retire(keys[0])
    other_run = f.session_key(run="other-run")
    cache.save(other_run, f.session_write())
    ended = cache.end_owner(f.run_of(keys[0]), "partial_succeeded")
    assert set(ended.keys) == set(keys)
    assert cache.begin_cleanup(f.run_of(keys[0]), ended.keys) == 4
    statuses = {k: cache.load(k).record for k in keys}
    assert all(r is not None and r.status is not SessionStatus.ACTIVE for r in statuses.values())
    retired = statuses[keys[0]]
    assert retired is not None and retired.status is SessionStatus.CLEANED and retired.version == 2
    assert cache.load(other_run).session is not None  # another run is untouched
    assert cache.begin_cleanup(f.run_of(keys[0]), ended.keys) == 0  # idempotent


def test_end_run_twice_reports_already_ended_and_keeps_the_first_outcome(
    cache: RedisSessionCache, key: SessionKey
) -> None:
    """A second end_owner says already_ended and changes neither outcome nor ended_at."""
    cache.save(key, f.session_write())
    first = cache.end_owner(f.run_of(key), ended(key, "failed"))
    state = cache.owner_state(f.run_of(key))
    second = cache.end_owner(f.run_of(key), ended(key, "succeeded"))
    assert (first.already_ended, second.already_ended) == (False, True)
    assert second.keys == first.keys == (key,)
    assert cache.owner_state(f.run_of(key)) == state
    assert state["outcome"] == ended(key, "failed") and state["state"] == "ended"


def test_run_set_holds_short_members_and_still_reads_full_names(
    cache: RedisSessionCache, client: RedisClient
) -> None:
    """Saves and fills add ``<node>:<binding>:<agent>`` to the run set; a full session name
    left by an earlier build is listed (once) by owner_sessions and end_owner alike."""
    saved, filled, legacy = keys_of_run(3)
    run = f.run_of(saved)
    cache.save(saved, f.session_write())
    cache.fill(f.stored_session(key=filled))
    run_set = cache.keys.owner_sessions(run)
    client.sadd(run_set, cache.keys.session(legacy), cache.keys.session(saved))
    members = {m.decode() for m in client.smembers(run_set)}  # type: ignore[union-attr]
    assert cache.keys.owner_member(saved) in members
    assert cache.keys.owner_member(filled) in members
    expected = sorted([saved, filled, legacy], key=SessionKey.parts)
    assert cache.owner_sessions(run) == expected
    assert list(cache.end_owner(run, "succeeded").keys) == expected


def test_a_run_set_lost_to_eviction_is_rebuilt_by_the_next_save_of_a_dirty_session(
    cache: RedisSessionCache, client: RedisClient, key: SessionKey
) -> None:
    """The set has a TTL, so volatile-* may evict it while its sessions stay dirty."""
    cache.save(key, f.session_write())
    run_set = cache.keys.owner_sessions(f.run_of(key))
    client.delete(run_set)
    assert cache.save(key, f.session_write(), expected_version=1) == 2  # still dirty
    assert cache.owner_sessions(f.run_of(key)) == [key]
    assert int(client.pttl(run_set)) > 0  # type: ignore[arg-type]


def test_begin_cleanup_puts_back_run_set_members_lost_to_eviction(
    cache: RedisSessionCache, client: RedisClient
) -> None:
    """A run set evicted before the end must not let the run settle without a session."""
    keys = keys_of_run(2)
    for k in keys:
        cache.save(k, f.session_write())
    run = f.run_of(keys[0])
    client.delete(cache.keys.owner_sessions(run))
    assert cache.end_owner(run, "succeeded").keys == ()
    assert cache.begin_cleanup(run, keys) == 2
    assert cache.owner_sessions(run) == sorted(keys, key=SessionKey.parts)
    assert cache.begin_cleanup(run, [f.session_key(node="never-saved")]) == 0
    assert cache.owner_sessions(run) == sorted(keys, key=SessionKey.parts)  # no phantom member


# --- retire ---------------------------------------------------------------------------


def test_retire_of_a_missing_or_non_active_session_changes_nothing(
    cache: RedisSessionCache, client: RedisClient
) -> None:
    """retire returns None and writes nothing unless the session is active."""
    missing, retired, cleaning = keys_of_run(3)
    cache.save(retired, f.session_write())
    cache.retire(retired)
    cache.save(cleaning, f.session_write())
    run = f.run_of(cleaning)
    cache.begin_cleanup(run, cache.end_owner(run, "failed").keys)
    before = f.redis_state(client)
    for k in (missing, retired, cleaning):
        assert cache.retire(k, "failed-again") is None
    assert f.redis_state(client) == before


# --- ack_flush ------------------------------------------------------------------------


def test_ack_flush_removes_the_dirty_mark_only_when_the_version_did_not_move(
    cache: RedisSessionCache, key: SessionKey
) -> None:
    """Acking an older version records flushed_version but leaves the session dirty."""
    cache.save(key, f.session_write())
    v = cache.load(key).version
    assert cache.save(key, f.session_write()) == v + 1
    assert ack(cache, key, v) == (0, 1)
    record = cache.load(key).record
    assert record is not None and record.flushed_version == v and record.dirty
    assert dirty_score(cache, key) is not None and pttl(cache, key) == -1
    assert ack(cache, key, v + 1) == (1, 0)
    record = cache.load(key).record
    assert record is not None and record.flushed_version == v + 1 and not record.dirty
    assert dirty_score(cache, key) is None and pttl(cache, key) > 0
    assert ack(cache, key, v) == (0, 1)  # a late, older ack never moves flushed_version back
    record = cache.load(key).record
    assert record is not None and record.flushed_version == v + 1


def test_a_session_saved_during_its_flush_waits_a_full_delay_again(
    cache: RedisSessionCache, key: SessionKey
) -> None:
    """Ack of an older version re-scores the leftover change at ack time, so it coalesces."""
    cache.save(key, f.session_write())
    first = dirty_score(cache, key)
    v = cache.load(key).version
    cache.save(key, f.session_write())  # saved while the flush of v was running
    assert dirty_score(cache, key) == first  # a save never moves the first-dirty time
    before_ack = cache.server_time_ms()
    assert ack(cache, key, v) == (0, 1)
    rescored = dirty_score(cache, key)
    assert rescored is not None and first is not None
    assert rescored >= before_ack >= first


# --- fill -----------------------------------------------------------------------------


def test_fill_never_overwrites_a_present_key(
    cache: RedisSessionCache, client: RedisClient, key: SessionKey
) -> None:
    """fill returns False and leaves a present session exactly as it was."""
    cache.save(key, f.session_write())
    before = f.redis_state(client)
    newer = f.stored_session(key, version=99, write=f.session_write(f.snapshot("x")))
    assert cache.fill(newer) is False
    assert f.redis_state(client) == before


def test_fill_writes_a_missing_session_as_clean(cache: RedisSessionCache, key: SessionKey) -> None:
    """A filled session keeps its version, is clean (no dirty mark, TTL set) and in its run set."""
    stored = f.stored_session(key, version=7, write=f.session_write(f.snapshot("a", "b")))
    assert cache.fill(stored) is True
    record = cache.load(key).record
    assert record == stored
    assert record is not None and record.flushed_version == record.version == 7
    assert dirty_score(cache, key) is None
    assert ACTIVE_TTL_S * 1000 - TTL_SLACK_MS < pttl(cache, key) <= ACTIVE_TTL_S * 1000
    assert cache.owner_sessions(f.run_of(key)) == [key]
    assert cache.save(key, f.session_write(), expected_version=7) == 8  # the version never restarts


# --- backlog --------------------------------------------------------------------------


def test_full_shard_backlog_refuses_new_sessions_and_writes_nothing(
    make_cache: MakeCache, client: RedisClient
) -> None:
    """With N dirty sessions in a shard a new one is refused; re-saving a dirty one is allowed."""
    cache = make_cache(shards=4, max_dirty_per_shard=3)
    keys = f.keys_in_shard(cache.keys, 2)
    full = [next(keys) for _ in range(3)]
    for k in full:
        cache.save(k, f.session_write())
    elsewhere = next(k for k in f.keys_in_shard(cache.keys, 1))
    cache.save(elsewhere, f.session_write())  # another shard has its own bound
    before = f.redis_state(client)
    refused = next(keys)
    with pytest.raises(BacklogFull) as info:
        cache.save(refused, f.session_write())
    assert info.value.backlog == 3
    assert f.redis_state(client) == before
    assert cache.save(full[0], f.session_write()) == 2
    assert ack(cache, full[1], 1) == (1, 0)
    assert cache.save(refused, f.session_write()) == 1


# --- expected_version -----------------------------------------------------------------


def test_expected_version_conflict_raises_and_writes_nothing(
    cache: RedisSessionCache, client: RedisClient, key: SessionKey
) -> None:
    """A stale expected_version is refused with nothing written; 0 means "only if absent"."""
    with pytest.raises(VersionConflict) as info:
        cache.save(key, f.session_write(), expected_version=1)
    assert (info.value.expected, info.value.actual) == (1, 0)
    assert set(f.redis_state(client)) == {cache.keys.meta.encode()}
    assert cache.save(key, f.session_write(), expected_version=0) == 1
    before = f.redis_state(client)
    for stale in (0, 2, 5):
        with pytest.raises(VersionConflict) as info:
            cache.save(key, f.session_write(f.snapshot("other")), expected_version=stale)
        assert (info.value.expected, info.value.actual) == (stale, 1)
    assert f.redis_state(client) == before
    assert cache.save(key, f.session_write(), expected_version=1) == 2


# --- size limits ----------------------------------------------------------------------


def test_oversized_snapshot_is_refused_and_nothing_reaches_redis(
    make_cache: MakeCache, client: RedisClient, key: SessionKey
) -> None:
    """PayloadTooLarge is raised before any I/O: Redis holds only the layout marker."""
    cache = make_cache(max_snapshot_bytes=4096)
    before = f.redis_state(client)
    with pytest.raises(PayloadTooLarge):
        cache.save(key, f.session_write(f.snapshot_of_size(5000)))
    assert f.redis_state(client) == before
    assert set(before) == {b"asc:meta"}
    assert cache.save(key, f.session_write(f.snapshot_of_size(3000))) == 1


# --- layout ---------------------------------------------------------------------------


def test_a_second_cache_with_another_shard_count_raises_configuration_error(
    make_cache: MakeCache,
) -> None:
    """The shard count is fixed on first use; another count on the same Redis refuses to start."""
    make_cache(shards=64)
    make_cache(shards=64)  # the same count is fine
    with pytest.raises(ConfigurationError, match="shards"):
        make_cache(shards=16)
    make_cache(shards=16, key_prefix="other")  # another key space has its own layout


# --- corrupt values -------------------------------------------------------------------


def test_corrupt_value_is_reported_naming_its_key_and_others_still_decode(
    cache: RedisSessionCache, client: RedisClient
) -> None:
    """load raises CorruptValue naming key and field; read_many returns it for that entry only."""
    bad, good = keys_of_run(2)
    missing = f.session_key(run="missing")
    cache.save(bad, f.session_write())
    cache.save(good, f.session_write())
    client.hset(name_of(cache, bad), "snapshot", b"\xc1garbage")
    with pytest.raises(CorruptValue) as info:
        cache.load(bad)
    assert (info.value.key, info.value.field) == (name_of(cache, bad), "snapshot")
    names = [name_of(cache, k) for k in (bad, good, missing)]
    result = cache.read_many(names)
    assert isinstance(result[0], CorruptValue) and result[0].key == names[0]
    assert isinstance(result[1], StoredSession) and result[1].key == good
    assert result[1].version == 1
    assert result[2] is None


# --- tenants --------------------------------------------------------------------------


def test_tenants_are_isolated(cache: RedisSessionCache) -> None:
    """The same run/node/binding/agent IDs under two tenants are two independent sessions."""
    a, b = f.session_key(tenant="tenant-a"), f.session_key(tenant="tenant-b")
    assert name_of(cache, a) != name_of(cache, b)
    cache.save(a, f.session_write())
    cache.save(a, f.session_write())
    assert cache.save(b, f.session_write()) == 1
    assert cache.load(a).version == 2
    cache.end_owner(f.run_of(a), "succeeded")
    assert cache.owner_state(f.run_of(b))["state"] == "open"
    assert cache.save(b, f.session_write()) == 2
    with pytest.raises(RunEnded):
        cache.save(a, f.session_write())
    assert cache.retire(b) == Retired(3, SessionStatus.CLEANED)
    loaded_a = cache.load(a)
    assert loaded_a.record is not None and loaded_a.record.status is SessionStatus.ACTIVE
    assert loaded_a.run_ended and loaded_a.session is None  # a's run ended; b's retire left a
    assert cache.owner_sessions(f.run_of(a)) == [a]
    assert cache.owner_sessions(f.run_of(b)) == [b]


def test_a_load_is_a_read_and_writes_nothing(cache: RedisSessionCache) -> None:
    """A load is two native reads: it renews no TTL. (A clean session that expires between a
    node's entry and its exit is read back from Postgres by the save: test_runs_and_lineage.)"""
    key = f.session_key()
    name = name_of(cache, key)
    cache.save(key, f.session_write())
    shard = cache.keys.shard_of_key(key)
    cache.ack_flush(shard, [(name, 1)])
    cache.client.pexpire(name, 5_000)
    before = f.redis_state(cache.client)
    loaded = cache.load(key)
    assert loaded.session is not None and loaded.version == 1
    assert f.redis_state(cache.client) == before
    assert 0 < int(cache.client.pttl(name)) <= 5_000  # type: ignore[arg-type]


def test_load_reports_an_ended_run_and_resumes_nothing_of_it(cache: RedisSessionCache) -> None:
    """After end_owner, load resumes no session of the run, even before begin_cleanup ran."""
    key = f.session_key()
    cache.save(key, f.session_write())
    cache.end_owner(f.run_of(key), ended(key, "aborted"))
    loaded = cache.load(key)
    assert loaded.run_ended and loaded.session is None and loaded.version == 1


def test_quarantine_parks_only_the_refused_version_unless_forced(cache: RedisSessionCache) -> None:
    """A session that moved on stays dirty instead of being poisoned; force always parks."""
    key = f.session_key()
    name = name_of(cache, key)
    shard = cache.keys.shard_of_key(key)
    cache.save(key, f.session_write())
    cache.save(key, f.session_write())
    assert cache.quarantine(shard, name, 1, "stale refusal") is False
    assert cache.poison(shard) == {} and cache.client.zscore(cache.keys.dirty(shard), name)
    assert cache.quarantine(shard, name, 0, "cannot decode", force=True) is True
    assert cache.poison(shard) == {name: "v0: cannot decode"}
    assert cache.client.zscore(cache.keys.dirty(shard), name) is None


def test_a_poisoned_session_never_gets_a_ttl_at_run_end(cache: RedisSessionCache) -> None:
    """begin_cleanup gives the short TTL only to cleaned sessions Postgres already holds."""
    key = f.session_key()
    name = name_of(cache, key)
    shard = cache.keys.shard_of_key(key)
    cache.save(key, f.session_write())
    cache.retire(key)
    assert cache.quarantine(shard, name, 2, "postgres refused: test")
    ending = cache.end_owner(f.run_of(key), "failed")
    cache.begin_cleanup(f.run_of(key), ending.keys)
    assert cache.client.pttl(name) == -1
