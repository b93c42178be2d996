"""Flushing one shard: dirty sessions → one fenced Postgres statement → ``ack_flush``.

The steps, each safe to repeat (DESIGN §5):

1. take the shard's flush lock (at most one flush per shard; any worker may take any shard);
2. read up to ``flush_batch`` dirty entries older than the cutoff, and their hashes in one
   pipeline;
3. upsert them in one statement, fenced by version, so a replayed or out-of-order flush can
   never move a row backwards;
4. acknowledge what Postgres now holds. A session saved again meanwhile stays dirty.

A row Postgres refuses, or one where Postgres is *ahead* of Redis, goes to the shard's poison
hash with the reason and does not hold back the rest. Any other failure acknowledges nothing:
the entries stay dirty and the job is retried.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.exceptions import LockError
from redis.lock import Lock

from cache.errors import CorruptValue
from cache.metrics import FLUSH_BATCHES, FLUSH_ERRORS, FLUSH_POISONED, FLUSH_ROWS, FLUSH_SECONDS
from cache.records import StoredSession
from cache.store import RedisSessionCache
from persistence.errors import RowRejected
from persistence.repository import SessionRepository, UpsertResult

log = logging.getLogger(__name__)


@dataclass
class FlushReport:
    """What one flush of one shard did."""

    shard: int
    locked: bool = True
    read: int = 0
    written: int = 0
    acked: int = 0
    still_dirty: int = 0
    full: bool = False
    poisoned: list[str] = field(default_factory=list)


_Written = tuple[list[tuple[str, StoredSession]], UpsertResult]


@dataclass(frozen=True, slots=True)
class _Batch:
    """The decoded sessions of one flush, and the key names that could not be decoded."""

    sessions: list[tuple[str, StoredSession]]
    corrupt: list[tuple[str, CorruptValue]]
    missing: list[str]


def flush_shard(
    cache: RedisSessionCache,
    repo: SessionRepository,
    shard: int,
    *,
    cutoff_ms: int,
    limit: int,
    lock_wait_s: float = 0.0,
) -> FlushReport:
    """Flush up to ``limit`` entries of ``shard`` that first became dirty before ``cutoff_ms``."""
    lock = cache.client.lock(
        cache.keys.flush_lock(shard),
        timeout=cache.settings.flush_lock_ttl_s,
        blocking=lock_wait_s > 0,
        blocking_timeout=lock_wait_s or None,
    )
    if not lock.acquire():
        return FlushReport(shard, locked=False)
    try:
        with FLUSH_SECONDS.time():
            report = _flush_locked(cache, repo, lock, shard, cutoff_ms=cutoff_ms, limit=limit)
    except Exception:
        FLUSH_ERRORS.inc()
        raise
    finally:
        _release(lock)
    FLUSH_BATCHES.inc(report.read > 0)
    FLUSH_ROWS.inc(report.written)
    FLUSH_POISONED.inc(len(report.poisoned))
    return report


def _release(lock: Lock) -> None:
    try:
        lock.release()
    except LockError:
        log.warning("flush lock expired before the flush finished; the fence kept it safe")


def _flush_locked(
    cache: RedisSessionCache,
    repo: SessionRepository,
    lock: Lock,
    shard: int,
    *,
    cutoff_ms: int,
    limit: int,
) -> FlushReport:
    entries = cache.dirty_entries(shard, older_than_ms=cutoff_ms, limit=limit)
    flush = _ShardFlush(cache, repo, lock, FlushReport(shard, read=len(entries)))
    flush.report.full = len(entries) == limit
    if entries:
        flush.run([entry.name for entry in entries])
    return flush.report


def _read(cache: RedisSessionCache, names: list[str]) -> _Batch:
    batch = _Batch([], [], [])
    for name, item in zip(names, cache.read_many(names, lazy=True), strict=True):
        if item is None:
            batch.missing.append(name)
        elif isinstance(item, CorruptValue):
            batch.corrupt.append((name, item))
        else:
            batch.sessions.append((name, item))
    return batch


@dataclass
class _ShardFlush:
    """One locked flush of one shard."""

    cache: RedisSessionCache
    repo: SessionRepository
    lock: Lock
    report: FlushReport

    def run(self, names: list[str]) -> None:
        batch = _read(self.cache, names)
        for name, error in batch.corrupt:
            self.poison(name, 0, f"cannot decode: {error.reason}", force=True)
        acks = [(name, 0) for name in batch.missing]
        self.keep_lock()
        acks += self.write(batch.sessions)
        self.keep_lock()
        self.report.acked, self.report.still_dirty = self.cache.ack_flush(self.report.shard, acks)

    def keep_lock(self) -> None:
        """Renew the shard lock before each slow step; if it was lost, carry on: the fence
        and the version-checked acknowledgement keep an overlapping flush harmless."""
        try:
            self.lock.reacquire()
        except LockError:
            log.warning("flush lock of shard %s was lost; continuing", self.report.shard)

    def write(self, sessions: list[tuple[str, StoredSession]]) -> list[tuple[str, int]]:
        """Upsert the batch, isolating refused rows; return the ``(name, version)`` acks."""
        if not sessions:
            return []
        try:
            results = [(sessions, self.repo.upsert_fenced([s for _, s in sessions]))]
        except RowRejected:
            results = self.write_one_by_one(sessions)
        acks: list[tuple[str, int]] = []
        for part, result in results:
            acks += self.settle(part, result)
        return acks

    def write_one_by_one(self, sessions: Sequence[tuple[str, StoredSession]]) -> list[_Written]:
        """The batch was refused: write each row alone so only the bad ones are parked."""
        results: list[_Written] = []
        for name, session in sessions:
            try:
                results.append(([(name, session)], self.repo.upsert_fenced([session])))
            except RowRejected as exc:
                self.poison(name, session.version, f"postgres refused: {exc}")
        return results

    def settle(
        self, sessions: list[tuple[str, StoredSession]], result: UpsertResult
    ) -> list[tuple[str, int]]:
        """Acks for rows written or already there; poison for rows where Postgres is ahead."""
        names = {session.key: name for name, session in sessions}
        self.report.written += len(result.written)
        acks = [(names[key], version) for key, version in result.written]
        acks += [(names[key], offered) for key, _, offered in result.stale_equal]
        for key, stored, offered in result.ahead:
            why = f"postgres is ahead of redis: stored version {stored} > flushed {offered}"
            self.poison(names[key], offered, why)
        return acks

    def poison(self, name: str, version: int, why: str, *, force: bool = False) -> None:
        if self.cache.quarantine(self.report.shard, name, version, why, force=force):
            log.error("flush: %s parked in the poison hash: %s", name, why)
            self.report.poisoned.append(name)
