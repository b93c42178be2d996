"""Flushing shards: dirty sessions → one fenced Postgres statement → ``ack_flush``.

The steps, each safe to repeat (DESIGN §5):

1. take the shard's flush lock (at most one flush per shard; any worker may take any shard)
   and keep it alive from a heartbeat thread, so a killed flusher holds its shard for at
   most ``flush_lock_ttl_s``;
2. read up to ``flush_batch`` dirty entries older than the cutoff, and their hashes in one
   pipeline;
3. upsert them in one statement, fenced by version, so a replayed or out-of-order flush can
   never move a row backwards;
4. acknowledge what Postgres now holds. A session saved again meanwhile stays dirty.

A flush job the trigger handed several shards flushes them together (:func:`flush_shards`),
in rounds no larger than one batch: every shard's lock and entries, one read, one statement
for all their rows, and each shard's acknowledgement.

A statement Postgres refuses is split in halves until the refused rows stand alone: a row
refused for its data goes to the shard's poison hash with the reason; a row whose
transaction keeps losing a race (SQLSTATE class 40/55) stays dirty for the next flush.
Neither holds back the rest. Rows the fence keeps are sorted by why: already applied
(acknowledged), Postgres *ahead* of Redis or holding *another lineage* of the session
(poisoned with the reason, never acknowledged silently), or an ``active`` save into a run
that ended (left dirty, and the run handed back to the reconciler, which stops the
session). Any other failure acknowledges nothing: the entries stay dirty and the job is
retried.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cache.errors import CorruptValue, StoreOutOfMemory
from cache.flush_side import MOVED_ON, Acked, DirtyEntry
from cache.metrics import FLUSH_BATCHES, FLUSH_ERRORS, FLUSH_POISONED, FLUSH_ROWS, FLUSH_SECONDS
from cache.records import Owner, SessionKey
from cache.store import RedisSessionCache
from persistence.errors import RowRejected, TransactionConflict
from persistence.repository import SessionRepository
from persistence.rows import HASH_FIELDS, SessionRow, row_of_hash
from persistence.upsert import UpsertResult
from workers.heartbeat import Heartbeat

log = logging.getLogger(__name__)

CONFLICT_RETRY_S = 0.05
"""Pause before a statement that lost a race is tried again (once) before it is split."""
_LOCK_RECHECK_S = 1.0
"""Longest block on the lock's free list before trying again: a holder that died releases
nothing, and its lock expires on its own."""


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
    deferred: list[str] = field(default_factory=list)
    """Rows whose statement kept losing a race: still dirty, tried again by the next flush."""
    run_ended: list[str] = field(default_factory=list)
    """Active saves into runs that ended: still dirty, their runs handed to the reconciler."""
    landed: int = 0
    """Rows Postgres now holds at the version read (written, or already there)."""
    batches: int = 0
    """Batches flushed under the shard's lock (a job's total over its flushes)."""


Named = tuple[str, SessionRow]


class ShardLock:
    """A shard's flush lock.

    The token names the holder (``host:pid:random``) so ``redis-cli GET`` shows who flushes.
    Taking it also lists the entries to flush (``begin_flush``), and the flush's
    acknowledgement releases it (``ack_flush``): a flush costs no round trip for its lock.
    The flush that holds it renews it (:meth:`renew`) from one heartbeat thread for all the
    locks it holds; a renewal and the acknowledgement never overlap (a renewal racing the
    release would take the lock again for a flush that is over). If a renewal finds the lock
    gone (the process stalled past its lifetime), the flush carries on: the version fence and
    the version-checked acknowledgement make an overlapping flush harmless.
    """

    def __init__(self, cache: RedisSessionCache, shard: int) -> None:
        self.cache = cache
        self.shard = shard
        self.ttl_ms = max(int(cache.settings.flush_lock_ttl_s * 1000), 1)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.released = False
        self._guard = threading.Lock()
        """Held by a renewal and by the release: one of them at a time."""
        self._block_s = min(_LOCK_RECHECK_S, cache.settings.socket_timeout_s / 2)

    def acquire(self, wait_s: float, *, delay_ms: int, limit: int) -> list[DirtyEntry] | None:
        """Take the lock (waiting up to ``wait_s``) and list up to ``limit`` entries first
        dirty at least ``delay_ms`` ago; ``None`` if another holder kept it all along."""
        deadline = time.monotonic() + wait_s
        while True:
            entries = self.cache.begin_flush(
                self.shard, self.token, self.ttl_ms, delay_ms=delay_ms, limit=limit
            )
            if entries is not None:
                return entries
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.cache.wait_lock_free(self.shard, min(left, self._block_s))

    def renew(self) -> None:
        """Extend the lock while it is held (a heartbeat's beat)."""
        with self._guard:
            if self.released:
                return
            try:
                if not self.cache.take_lock(self.shard, self.token, self.ttl_ms):
                    log.warning("flush lock of shard %s was lost; continuing", self.shard)
            except Exception:  # an outage: the flush itself will fail and say so
                log.warning("could not renew the flush lock of shard %s", self.shard)

    def ack(self, flushed: list[tuple[str, int]]) -> Acked:
        """Acknowledge the flush and release the lock in one round trip (``ack_flush``)."""
        with self._guard:
            acked = self.cache.ack_flush(self.shard, flushed, release=self.token)
            self.released = True
        if not acked.released:
            log.warning("flush lock of shard %s expired before the flush ended", self.shard)
        return acked

    def release(self) -> None:
        """Release the lock unless the acknowledgement did (a flush that failed first)."""
        with self._guard:
            if self.released:
                return
            self.released = True
            try:
                released = self.cache.release_lock(self.shard, self.token)
            except Exception:
                log.warning("could not release the flush lock of shard %s; it expires", self.shard)
                return
        if not released:
            log.warning("flush lock of shard %s expired before the flush ended", self.shard)


def flush_shard(
    cache: RedisSessionCache,
    repo: SessionRepository,
    shard: int,
    *,
    delay_ms: int,
    limit: int,
    lock_wait_s: float = 0.0,
) -> FlushReport:
    """Flush up to ``limit`` entries of ``shard`` that first became dirty at least
    ``delay_ms`` ago (by Redis's clock; 0 takes every entry)."""
    (report,) = flush_shards(
        cache, repo, [shard], delay_ms=delay_ms, limit=limit, lock_wait_s=lock_wait_s
    )
    return report


def flush_shards(
    cache: RedisSessionCache,
    repo: SessionRepository,
    shards: Sequence[int],
    *,
    delay_ms: int,
    limit: int,
    lock_wait_s: float = 0.0,
) -> list[FlushReport]:
    """:func:`flush_shard` of several shards together, in rounds of at most ``limit`` rows:
    each shard's lock and entries until the round holds ``limit`` rows, then one read, one
    fenced statement for all their rows, and each shard's acknowledgement (a loop's few rows
    over many shards cost one statement, not one per shard). A round is no larger than one
    shard's batch, so the bounds on a statement and on a worker's memory stay those of one
    batch; a shard cut short by that is reported ``full``. A shard that another holder keeps
    is reported ``locked=False``."""
    pending = list(shards)
    reports: list[FlushReport] = []
    while pending:
        reports += _flush_round(
            _Flush(cache, repo), pending, delay_ms=delay_ms, limit=limit, lock_wait_s=lock_wait_s
        )
    return reports


def _flush_round(
    flush: _Flush, pending: list[int], *, delay_ms: int, limit: int, lock_wait_s: float
) -> list[FlushReport]:
    """Take shards off the front of ``pending`` into ``flush`` until ``limit`` rows are
    listed; flush them."""
    reports = []
    with flush.holding():
        while pending and flush.rows < limit:
            reports.append(flush.take(pending.pop(0), delay_ms, limit - flush.rows, lock_wait_s))
        if flush.shards:
            try:
                with FLUSH_SECONDS.time():
                    flush.run()
            except Exception:
                FLUSH_ERRORS.inc()
                raise
    for report in flush.shards.values():
        FLUSH_BATCHES.inc(report.read > 0)
        FLUSH_ROWS.inc(report.written)
        FLUSH_POISONED.inc(len(report.poisoned))
    return reports


def flush_session(cache: RedisSessionCache, repo: SessionRepository, key: SessionKey) -> bool:
    """Write one session to Postgres now, without the shard lock; whether Postgres holds the
    version Redis had (a durable pause). Raises what the upsert raises."""
    shard = cache.keys.shard_of_key(key)
    # From application threads (durable pauses): the engine's bounded pool, not a
    # connection per thread.
    flush = _Flush(cache, repo, direct=False)
    flush.add(shard, FlushReport(shard, read=1), [cache.keys.session(key)])
    flush.run()
    return flush.shards[shard].landed == 1


def _split(part: list[Named], parts: list[list[Named]]) -> bool:
    """Queue the halves of a refused statement; ``False`` if it was a single row."""
    if len(part) == 1:
        return False
    middle = len(part) // 2
    parts += [part[middle:], part[:middle]]
    return True


@dataclass
class _Flush:
    """One flush of one or more shards: read, write (splitting refused statements),
    acknowledge each shard's entries (which releases its lock)."""

    cache: RedisSessionCache
    repo: SessionRepository
    direct: bool = True
    """Upsert on the thread's own connection (flusher threads) or the engine's pool."""
    shards: dict[int, FlushReport] = field(default_factory=dict)
    locks: dict[int, ShardLock] = field(default_factory=dict)
    """The shards' locks (none for ``flush_session``)."""
    shard_of: dict[str, int] = field(default_factory=dict)
    """Each listed session's shard, by key name."""
    rows: int = 0
    """Entries listed so far."""

    def take(self, shard: int, delay_ms: int, limit: int, lock_wait_s: float) -> FlushReport:
        """Lock ``shard`` and list its entries into this flush; a report either way."""
        lock = ShardLock(self.cache, shard)
        entries = lock.acquire(lock_wait_s, delay_ms=delay_ms, limit=limit)
        if entries is None:
            return FlushReport(shard, locked=False)
        report = FlushReport(shard, read=len(entries), full=len(entries) == limit)
        self.locks[shard] = lock
        self.add(shard, report, [entry.name for entry in entries])
        return report

    def add(self, shard: int, report: FlushReport, names: list[str]) -> None:
        self.shards[shard] = report
        self.shard_of |= dict.fromkeys(names, shard)
        self.rows += len(names)

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Renew every lock this flush takes, from one heartbeat thread, while it runs;
        release the locks no acknowledgement released (a flush that failed, even while it was
        still taking locks)."""
        period = self.cache.settings.flush_lock_ttl_s / 4
        heart = Heartbeat(self.renew_all, period, "flush-locks")
        heart.start()
        try:
            yield
        finally:
            heart.stop()
            for lock in list(self.locks.values()):
                lock.release()

    def renew_all(self) -> bool:
        """Renew every lock taken so far (a heartbeat's beat; ``True``: keep beating)."""
        for lock in list(self.locks.values()):
            lock.renew()
        return True

    def run(self) -> None:
        """Rows straight from the hashes' bytes (no record is built), marked as being
        flushed, then written and acknowledged shard by shard."""
        names = list(self.shard_of)
        sessions: list[Named] = []
        acks: list[tuple[str, int]] = []
        now = datetime.now(UTC)
        for name, item in zip(names, self.cache.read_fields(names, HASH_FIELDS), strict=True):
            if item is None:
                acks.append((name, 0))  # gone (expired or deleted): nothing to write
                continue
            try:
                if isinstance(item, CorruptValue):
                    raise item
                sessions.append((name, row_of_hash(name, *item, now)))
            except CorruptValue as exc:
                self.poison(name, 0, f"cannot decode: {exc.reason}", force=True)
        written = self.write(self.marked(sessions))
        for name, _ in written:
            self.report_of(name).landed += 1
        self.acknowledge(acks + written)

    def acknowledge(self, acks: list[tuple[str, int]]) -> None:
        """Each shard's acknowledgement (its lock released by it, in the same round trip)."""
        by_shard: dict[int, list[tuple[str, int]]] = {shard: [] for shard in self.shards}
        for name, version in acks:
            by_shard[self.shard_of[name]].append((name, version))
        for shard, flushed in by_shard.items():
            lock = self.locks.get(shard)
            acked = lock.ack(flushed) if lock else self.cache.ack_flush(shard, flushed)
            report = self.shards[shard]
            report.acked, report.still_dirty = acked.acked, acked.still_dirty

    def marked(self, sessions: list[Named]) -> list[Named]:
        """``mark_flushing`` (one call per shard: its keys share a slot): each row learns the
        highest version its Redis copy knows reached Postgres (the fence refuses a Postgres
        that holds more); a session saved again since it was read is left for the next
        flush."""
        by_shard: dict[int, list[Named]] = {}
        for name, row in sessions:
            by_shard.setdefault(self.shard_of[name], []).append((name, row))
        marked: list[Named] = []
        for part in by_shard.values():
            known = self.cache.mark_flushing([(name, row.version) for name, row in part])
            marked += [
                (name, dataclasses.replace(row, known_version=version))
                for (name, row), version in zip(part, known, strict=True)
                if version != MOVED_ON
            ]
        return marked

    def write(self, sessions: list[Named]) -> list[tuple[str, int]]:
        """Upsert the batch, splitting statements Postgres refuses; the ``(name, version)``
        acks of every row that landed or was already there."""
        acks: list[tuple[str, int]] = []
        parts = [sessions] if sessions else []
        while parts:
            part = parts.pop()
            try:
                acks += self.settle(part, self.upsert(part))
            except RowRejected as exc:
                if not _split(part, parts):
                    name, session = part[0]
                    self.poison(name, session.version, f"postgres refused: {exc}")
            except TransactionConflict as exc:
                if not _split(part, parts):
                    name = part[0][0]
                    log.warning("flush: %s deferred; its statement keeps failing: %s", name, exc)
                    self.report_of(name).deferred.append(name)
        return acks

    def upsert(self, part: list[Named]) -> UpsertResult:
        """One statement; tried once more after a short pause if it lost a race."""
        batch = [row for _, row in part]
        try:
            return self.repo.upsert_rows(batch, direct=self.direct)
        except TransactionConflict:
            time.sleep(CONFLICT_RETRY_S)
            return self.repo.upsert_rows(batch, direct=self.direct)

    def settle(self, sessions: list[Named], result: UpsertResult) -> list[tuple[str, int]]:
        """Acks for rows written or already there; poison for rows where Postgres is ahead."""
        names = {session.key: name for name, session in sessions}
        for key, _ in result.written:
            self.report_of(names[key]).written += 1
        acks = [(names[key], version) for key, version in result.written]
        acks += [(names[key], offered) for key, _, offered in result.stale_equal]
        for key, stored, offered in result.ahead:
            why = f"postgres is ahead of redis: stored version {stored} > flushed {offered}"
            self.poison(names[key], offered, why)
        for divergence in result.diverged:
            self.poison(names[divergence.key], divergence.offered_version, divergence.why)
        if result.run_ended:
            self.stop_ended(result.run_ended, names)
        return acks

    def stop_ended(self, keys: list[SessionKey], names: dict[SessionKey, str]) -> None:
        """Active saves into runs Postgres records as ended. If Redis lost the run's marker,
        move them to ``cleaning`` here, so the next flush writes that; if the marker still
        says ``open``, ``workflow_ended`` is between its two steps (or crashed there) and
        does it. Either way the reconciler visits their runs now."""
        for key in keys:
            self.report_of(names[key]).run_ended.append(names[key])
        by_run: dict[Owner, list[SessionKey]] = {}
        for key in keys:
            by_run.setdefault(key.owner, []).append(key)
        for run, stopped in by_run.items():
            if self.cache.owner_state(run).get("state") != "open":
                try:
                    self.cache.begin_cleanup(run, stopped)
                except StoreOutOfMemory as exc:  # the rest of the batch is still acknowledged
                    log.warning("flush: %s left to the reconciler: %s", run, exc)
        self.repo.recheck_owners(by_run)

    def poison(self, name: str, version: int, why: str, *, force: bool = False) -> None:
        shard = self.shard_of[name]
        if self.cache.quarantine(shard, name, version, why, force=force):
            log.error("flush: %s parked in the poison hash: %s", name, why)
            self.shards[shard].poisoned.append(name)

    def report_of(self, name: str) -> FlushReport:
        return self.shards[self.shard_of[name]]
