"""Redis Cluster specifics: keys spread over every primary, every script and read_many work.

The invariants themselves run on the cluster too (``test_store_invariants`` is parametrized).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
from redis.cluster import ClusterNode

from cache.errors import CorruptValue, RunEnded, RunUnknown
from cache.flush_side import MOVED_ON
from cache.records import SessionKey, SessionStatus, StoredSession
from cache.replies import Retired
from cache.scripts import SCRIPT_NAMES
from cache.settings import Settings
from cache.store import RedisSessionCache
from tests import factories as f

RUNS = 60


@pytest.fixture
def cache(cluster_client: redis.RedisCluster) -> RedisSessionCache:
    return RedisSessionCache(cluster_client, Settings(active_ttl_s=5000, cleaned_ttl_s=50))


def node_of(client: redis.RedisCluster, name: str) -> ClusterNode:
    node = client.get_node_from_key(name)
    assert node is not None
    return node


def one_key_per_primary(cache: RedisSessionCache) -> list[SessionKey]:
    """A session key (each of its own run) on each primary of the cluster."""
    client = cache.client
    assert isinstance(client, redis.RedisCluster)
    found: dict[str, SessionKey] = {}
    for i in range(1000):
        key = f.session_key(run=f"spread-{i}")
        found.setdefault(node_of(client, cache.keys.session(key)).name, key)
        if len(found) == len(client.get_primaries()):
            return list(found.values())
    raise AssertionError("could not find a run on every primary")


def test_sessions_of_many_runs_land_on_all_three_primaries(
    cache: RedisSessionCache, cluster_client: redis.RedisCluster
) -> None:
    """Shard hash tags spread runs over every primary; all keys of one run share a slot."""
    primaries = cluster_client.get_primaries()
    assert len(primaries) == 3
    for i in range(RUNS):
        key = f.session_key(run=f"run-{i}")
        cache.save(key, f.session_write())
        run = f.run_of(key)
        names = [
            cache.keys.session(key),
            cache.keys.owner(run),
            cache.keys.owner_sessions(run),
            cache.keys.dirty(cache.keys.shard_of_key(key)),
        ]
        assert len({cluster_client.keyslot(name) for name in names}) == 1
        assert all(cluster_client.exists(name) for name in names)
    sizes = {node.name: cluster_client.dbsize(target_nodes=node) for node in primaries}
    assert all(size > 0 for size in sizes.values()), sizes
    assert len({cache.keys.shard_of("tenant-1", f"run-{i}") for i in range(RUNS)}) > 30


def dirty_names(cache: RedisSessionCache, shard: int) -> list[str]:
    """The shard's dirty set, oldest first."""
    members: list[bytes] = cache.client.zrange(cache.keys.dirty(shard), 0, -1)  # type: ignore[assignment]
    return [member.decode() for member in members]


def _exercise_load(cache: RedisSessionCache, key: SessionKey) -> None:
    assert cache.load(key).record is None
    cache.save(key, f.session_write())
    loaded = cache.load(key)
    assert loaded.session is not None and loaded.version == 1 and not loaded.run_ended


def _exercise_save(cache: RedisSessionCache, key: SessionKey) -> None:
    assert cache.save(key, f.session_write()) == 1
    assert cache.save(key, f.session_write(), expected_version=1) == 2


def _exercise_retire(cache: RedisSessionCache, key: SessionKey) -> None:
    cache.save(key, f.session_write())
    assert cache.retire(key, "failed-run") == Retired(2, SessionStatus.CLEANED)
    assert cache.retire(key) is None
    record = cache.load(key).record
    assert record is not None and record.status is SessionStatus.CLEANED


def _exercise_end_run_and_cleanup(cache: RedisSessionCache, key: SessionKey) -> None:
    cache.save(key, f.session_write())
    ended = cache.end_owner(f.run_of(key), "succeeded")
    assert ended.keys == (key,) and not ended.already_ended
    assert cache.end_owner(f.run_of(key), "failed").already_ended
    with pytest.raises(RunEnded):
        cache.save(key, f.session_write())
    assert cache.begin_cleanup(f.run_of(key), ended.keys) == 1
    assert cache.note_cleanup(key, "cleanup-0", 0)
    assert cache.cleanup_state(key) == ("cleanup-0", 0)
    assert cache.mark_cleaned(key, cleanup_run_id="cleanup-1") == 3
    assert not cache.note_cleanup(key, "cleanup-2", 1)  # only while cleaning
    assert cache.mark_cleaned(key) is None
    shard = cache.keys.shard_of_key(key)
    assert cache.ack_flush(shard, [(cache.keys.session(key), 3)])[:2] == (1, 0)
    assert 0 < int(cache.client.pttl(cache.keys.session(key))) <= 50_000  # type: ignore[arg-type]
    run = cache.keys.owner(f.run_of(key))
    assert int(cache.client.pttl(run)) == -1  # type: ignore[arg-type]  # ended: not evictable
    assert cache.settle_owner(f.run_of(key))
    assert int(cache.client.pttl(run)) > 0  # type: ignore[arg-type]


def _exercise_open_run(cache: RedisSessionCache, key: SessionKey) -> None:
    run = f.run_of(key)
    with pytest.raises(RunUnknown):
        cache.save(key, f.session_write(), verify_run=True)
    assert cache.open_owner(run)
    assert not cache.open_owner(run)
    assert not cache.settle_owner(run)  # not ended
    assert cache.save(key, f.session_write(), verify_run=True) == 1


def _exercise_ack_flush(cache: RedisSessionCache, key: SessionKey) -> None:
    cache.save(key, f.session_write())
    cache.save(key, f.session_write())
    shard, name = cache.keys.shard_of_key(key), cache.keys.session(key)
    assert cache.ack_flush(shard, [(name, 1)])[:2] == (0, 1)
    assert cache.ack_flush(shard, [(name, 2)])[:2] == (1, 0)
    assert dirty_names(cache, shard) == []


def _exercise_mark_flushing(cache: RedisSessionCache, key: SessionKey) -> None:
    cache.save(key, f.session_write())
    name = cache.keys.session(key)
    assert cache.mark_flushing([(name, 1)]) == [0]  # a new session knows nothing flushed
    assert cache.mark_flushing([(name, 1)]) == [1]  # now it knows v1 was being written
    assert cache.mark_flushing([(name, 7)]) == [MOVED_ON]


def _exercise_fill(cache: RedisSessionCache, key: SessionKey) -> None:
    stored = f.stored_session(key, version=5)
    assert cache.fill(stored) is True
    assert cache.fill(f.stored_session(key, version=9)) is False
    assert cache.load(key).record == stored
    assert cache.fill(f.stored_session(key, version=4), behind=True) is False  # not older
    newer = f.stored_session(key, version=9)
    assert cache.fill(newer, behind=True) is True  # a clean, older copy gives way
    assert cache.load(key).record == newer
    cache.save(key, f.session_write())  # v10, not flushed
    assert cache.fill(f.stored_session(key, version=12), behind=True) is False
    assert cache.load(key).version == 10


def _exercise_quarantine(cache: RedisSessionCache, key: SessionKey) -> None:
    cache.save(key, f.session_write())
    shard, name = cache.keys.shard_of_key(key), cache.keys.session(key)
    assert cache.quarantine(shard, name, 1, "postgres refused it")
    assert name in cache.poison(shard)
    assert dirty_names(cache, shard) == []


def _exercise_locks(cache: RedisSessionCache, key: SessionKey) -> None:
    shard = cache.keys.shard_of_key(key)
    assert cache.take_lock(shard, "holder-a", 5000)
    assert not cache.take_lock(shard, "holder-b", 5000)
    assert cache.take_lock(shard, "holder-a", 9000)  # the holder extends it
    assert 5000 < int(cache.client.pttl(cache.keys.flush_lock(shard))) <= 9000  # type: ignore[arg-type]
    assert not cache.release_lock(shard, "holder-b")
    assert cache.release_lock(shard, "holder-a")
    assert cache.take_lock(shard, "holder-b", 5000)
    assert cache.release_lock(shard, "holder-b")


def _exercise_begin_flush(cache: RedisSessionCache, key: SessionKey) -> None:
    cache.save(key, f.session_write())
    shard, name = cache.keys.shard_of_key(key), cache.keys.session(key)
    assert cache.begin_flush(shard, "holder-a", 5000, delay_ms=60_000, limit=10) == []
    entries = cache.begin_flush(shard, "holder-a", 5000, delay_ms=0, limit=10)
    assert entries is not None and [e.name for e in entries] == [name]
    assert cache.begin_flush(shard, "holder-b", 5000, delay_ms=0, limit=10) is None
    assert cache.ack_flush(shard, [(name, 1)], release="holder-a") == (1, 0, True)
    assert cache.begin_flush(shard, "holder-b", 5000, delay_ms=0, limit=10) == []
    assert cache.ack_flush(shard, [], release="holder-a") == (0, 0, False)  # not its lock


def _exercise_poison_remedies(cache: RedisSessionCache, key: SessionKey) -> None:
    shard, name = cache.keys.shard_of_key(key), cache.keys.session(key)
    cache.save(key, f.session_write())
    assert not cache.retry_poisoned(name) and not cache.drop_poisoned(name)  # not parked
    assert cache.quarantine(shard, name, 1, "postgres refused it")
    assert cache.retry_poisoned(name)
    assert name not in cache.poison(shard)
    assert dirty_names(cache, shard) == [name]
    assert cache.quarantine(shard, name, 1, "postgres refused it again")
    cache.client.sadd(cache.keys.owner_sessions(f.run_of(key)), name)  # an earlier build's member
    assert cache.drop_poisoned(name)
    assert cache.load(key).record is None and cache.owner_sessions(f.run_of(key)) == []


EXERCISES: dict[str, Callable[[RedisSessionCache, SessionKey], None]] = {
    "save": _exercise_save,
    "retire": _exercise_retire,
    "end_owner": _exercise_end_run_and_cleanup,
    "begin_cleanup": _exercise_end_run_and_cleanup,
    "mark_cleaned": _exercise_end_run_and_cleanup,
    "ack_flush": _exercise_ack_flush,
    "fill": _exercise_fill,
    "quarantine": _exercise_quarantine,
    "open_owner": _exercise_open_run,
    "settle_owner": _exercise_end_run_and_cleanup,
    "note_cleanup": _exercise_end_run_and_cleanup,
    "retry_poisoned": _exercise_poison_remedies,
    "drop_poisoned": _exercise_poison_remedies,
    "mark_flushing": _exercise_mark_flushing,
    "take_lock": _exercise_locks,
    "release_lock": _exercise_locks,
    "begin_flush": _exercise_begin_flush,
}


def test_load_works_on_every_primary(cache: RedisSessionCache) -> None:
    """A load is two native commands of one slot, pipelined through the cluster client."""
    for key in one_key_per_primary(cache):
        _exercise_load(cache, key)


def test_the_trigger_reads_every_shards_backlog_across_primaries(cache: RedisSessionCache) -> None:
    """The trigger's one round trip of ZCARD + oldest score per shard, on every primary."""
    keys = one_key_per_primary(cache)
    before = cache.server_time_ms()
    for key in keys:
        cache.save(key, f.session_write())
    backlog = {
        shard: (count, oldest)
        for shard, count, oldest in cache.shard_backlog(list(cache.keys.all_shards()))
    }
    dirty = {cache.keys.shard_of_key(key) for key in keys}
    assert all(backlog[s][0] >= 1 and (backlog[s][1] or 0) >= before for s in dirty)
    assert all(backlog[s] == (0, None) for s in backlog if s not in dirty)


def test_every_script_has_a_cluster_exercise() -> None:
    assert set(EXERCISES) == set(SCRIPT_NAMES)


@pytest.mark.parametrize("script", sorted(set(SCRIPT_NAMES)))
def test_every_script_works_on_every_primary(cache: RedisSessionCache, script: str) -> None:
    """Each script runs on the cluster (single-slot keys) for a run on each of the 3 primaries."""
    for key in one_key_per_primary(cache):
        EXERCISES[script](cache, key)


def test_read_many_reads_across_slots_and_primaries(
    cache: RedisSessionCache, cluster_client: redis.RedisCluster
) -> None:
    """read_many's pipeline works on RedisCluster across slots, in order, corrupt one isolated."""
    keys = [f.session_key(run=f"many-{i}") for i in range(40)]
    for i, key in enumerate(keys):
        cache.save(key, f.session_write(f.snapshot(f"layer-{i}")))
    names = [cache.keys.session(key) for key in keys]
    assert len({node_of(cluster_client, name).name for name in names}) == 3
    missing = cache.keys.session(f.session_key(run="absent"))
    cluster_client.hset(names[7], "version", "not-a-number")
    result = cache.read_many([*names, missing])
    assert result[-1] is None
    bad = result[7]
    assert isinstance(bad, CorruptValue) and (bad.key, bad.field) == (names[7], "version")
    for i, (key, read) in enumerate(zip(keys, result[:-1], strict=True)):
        if i == 7:
            continue
        assert isinstance(read, StoredSession) and read.key == key
        assert read.snapshot.layer_names() == (f"layer-{i}",)
