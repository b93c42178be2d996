"""Concurrency: optimistic saves from threads and processes, and saves racing the run's end.

Everyone starts at a Barrier; nothing sleeps. Every assertion is on what Redis holds at the end.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from cache.errors import RunEnded, VersionConflict
from cache.records import SessionKey, SessionStatus
from cache.replies import EndedOwner
from cache.settings import Settings
from cache.store import RedisSessionCache
from tests import factories as f

MAX_ATTEMPTS = 100_000
BARRIER_TIMEOUT_S = 60


def save_once_optimistically(cache: RedisSessionCache, key: SessionKey, tag: str) -> int:
    """load -> save(expected_version=loaded.version), retried on conflict; the saved version."""
    for _ in range(MAX_ATTEMPTS):
        loaded = cache.load(key)
        try:
            return cache.save(
                key, f.session_write(f.snapshot(tag)), expected_version=loaded.version
            )
        except VersionConflict:
            continue
    raise AssertionError(f"no successful save in {MAX_ATTEMPTS} attempts")


def run_threads(count: int, target: Callable[[int], Any]) -> list[Any]:
    """Run ``target(i)`` on ``count`` threads; re-raise the first failure."""
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(target, i) for i in range(count)]
        return [future.result(timeout=300) for future in futures]


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_no_lost_update_with_100_threads(request: pytest.FixtureRequest, where: str) -> None:
    """100 threads each land one optimistic save: versions 1..100, none lost."""
    client = request.getfixturevalue("redis_client" if where == "standalone" else "cluster_client")
    cache = RedisSessionCache(client, Settings())
    key = f.session_key()
    barrier = threading.Barrier(100)

    def worker(i: int) -> int:
        barrier.wait(BARRIER_TIMEOUT_S)
        return save_once_optimistically(cache, key, f"thread-{i}")

    versions = run_threads(100, worker)
    assert sorted(versions) == list(range(1, 101))
    assert cache.load(key).version == 100


def _process_worker(
    url: str, key: SessionKey, saves: int, barrier: Any, results: Any, index: int
) -> None:
    """Child process: its own client; ``saves`` optimistic saves; versions to ``results``."""
    with redis.Redis.from_url(url) as client:
        cache = RedisSessionCache(client, Settings())
        barrier.wait(BARRIER_TIMEOUT_S)
        versions = [save_once_optimistically(cache, key, f"p{index}") for _ in range(saves)]
    results.put(versions)


def test_no_lost_update_with_processes(redis_client: redis.Redis, redis_url: str) -> None:
    """8 processes x 25 optimistic saves: versions 1..200, each exactly once."""
    processes, saves = 8, 25
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    key = f.session_key()
    children = [
        ctx.Process(target=_process_worker, args=(redis_url, key, saves, barrier, results, i))
        for i in range(processes)
    ]
    for child in children:
        child.start()
    try:
        versions = [v for _ in children for v in results.get(timeout=240)]
    finally:
        for child in children:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
                child.join()
    assert [child.exitcode for child in children] == [0] * processes
    assert sorted(versions) == list(range(1, processes * saves + 1))
    cache = RedisSessionCache(redis_client, Settings())
    assert cache.load(key).version == processes * saves


@dataclass
class SaverLog:
    saved: list[tuple[SessionKey, int]] = field(default_factory=list)
    refused_after_end: list[SessionKey] = field(default_factory=list)


def check_end_state(
    cache: RedisSessionCache,
    keys: list[SessionKey],
    logs: list[SaverLog],
    ended: EndedOwner,
    moved: int,
) -> None:
    """end_owner listed exactly the saved sessions; each was bumped once, by begin_cleanup."""
    highest: dict[SessionKey, int] = {}
    for key, version in (entry for log in logs for entry in log.saved):
        highest[key] = max(highest.get(key, 0), version)
    assert set(ended.keys) == set(highest)
    assert moved == len(highest)
    for key in keys:
        record = cache.load(key).record
        if key not in highest:
            assert record is None, "a save refused at the end must write nothing"
            continue
        assert record is not None and record.status is SessionStatus.CLEANING
        # exactly one bump after the last landed save: begin_cleanup, nothing later
        assert record.version == highest[key] + 1


@pytest.mark.parametrize("rep", range(20))
def test_saves_racing_end_run_never_land_after_the_end(redis_client: redis.Redis, rep: int) -> None:
    """After end_owner + begin_cleanup no session is active and no save landed after the end."""
    cache = RedisSessionCache(redis_client, Settings())
    run = f.run_ref(run=f"race-{rep}")
    savers, keys_each = 8, 4
    keys = [
        [f.session_key(run=run.owner_id, node=f"n{s}-{k}") for k in range(keys_each)]
        for s in range(savers)
    ]
    barrier = threading.Barrier(savers + 1)
    progress = threading.Semaphore(0)
    end_after = rep * 3  # successful saves before the end: 0 .. 57 across repetitions
    ended: list[EndedOwner] = []
    moved: list[int] = []

    def saver(s: int) -> SaverLog:
        log = SaverLog()
        barrier.wait(BARRIER_TIMEOUT_S)
        for i in range(MAX_ATTEMPTS):
            key = keys[s][i % keys_each]
            try:
                version = cache.save(key, f.session_write(f.snapshot(f"s{s}")))
            except RunEnded:
                break
            log.saved.append((key, version))
            progress.release()
        else:
            raise AssertionError("the run never ended")
        for key in keys[s]:  # every later save, to any session of the run, is refused
            with pytest.raises(RunEnded):
                cache.save(key, f.session_write())
            log.refused_after_end.append(key)
        return log

    def ender() -> None:
        barrier.wait(BARRIER_TIMEOUT_S)
        deadline = time.monotonic() + 60
        for _ in range(end_after):
            assert progress.acquire(timeout=max(0.0, deadline - time.monotonic()))
        ended.append(cache.end_owner(run, "succeeded"))
        moved.append(cache.begin_cleanup(run, ended[0].keys))

    results = run_threads(savers + 1, lambda i: ender() if i == savers else saver(i))
    logs: list[SaverLog] = results[:savers]

    assert sum(len(log.saved) for log in logs) >= end_after
    assert all(len(log.refused_after_end) == keys_each for log in logs)
    check_end_state(cache, [k for row in keys for k in row], logs, ended[0], moved[0])
    assert cache.owner_state(run)["state"] == "ended"
