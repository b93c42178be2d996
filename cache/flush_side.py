"""The flush side of :class:`cache.store.RedisSessionCache`: the dirty sets, the flush lock,
acknowledgements, the poison hash, the flush triggers' records and the counters.

A mixin, the way redis-py splits a client's commands by family: the store's class inherits
it, and callers see one object. What it uses of the store (the client, the key space, the
scripts, the settings, the pinned-connection ``EVALSHA``) is declared below.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from cache.client import RedisClient, translate_errors
from cache.errors import StoreOutOfMemory, StoreUnavailable
from cache.keys import KeySpace
from cache.scripts import OK, OK_OR_NOOP, Code, Scripts, check_code
from cache.settings import Settings

log = logging.getLogger(__name__)

MOVED_ON = -2
"""``mark_flushing``'s answer for a session saved again (or gone) since the flush read it."""
_UNKNOWN = -1
TRIGGER_RECORD_KEEP_MS = 3_600_000
"""A flush trigger's record outlives its last pass by this long (then it is dropped)."""


@dataclass(frozen=True, slots=True)
class DirtyEntry:
    """A session waiting for Postgres, and when it first became dirty (Redis time, ms)."""

    name: str
    since_ms: int


class Acked(NamedTuple):
    """What ``ack_flush`` did."""

    acked: int
    """Sessions made clean: Postgres holds their current version."""
    still_dirty: int
    """Sessions saved again meanwhile: they stay dirty."""
    released: bool
    """The flush lock was released (only when asked to)."""


class FlushSide:
    """Commands of the write-behind: what flushers, the trigger and the CLI's ``stats`` and
    ``poison`` use."""

    client: RedisClient
    keys: KeySpace
    scripts: Scripts
    settings: Settings

    if TYPE_CHECKING:

        def _call(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any: ...

        def _reads(self, commands: Sequence[Sequence[Any]]) -> list[Any]: ...

        def _ms(self, seconds: float) -> int: ...

    def server_time_ms(self) -> int:
        """Redis's clock, the one dirty scores are written with."""
        with translate_errors("reading the server time"):
            seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def ack_flush(
        self, shard: int, flushed: Sequence[tuple[str, int]], *, release: str = ""
    ) -> Acked:
        """Record flushed ``(key name, version)`` pairs; with ``release``, then give up the
        shard's flush lock if that token still holds it (one round trip for both)."""
        if not flushed and not release:
            return Acked(0, 0, False)
        keys = [self.keys.dirty(shard), self.keys.poison(shard), *self._lock_keys(shard)]
        keys += [name for name, _ in flushed]
        args: list[Any] = [
            self._ms(self.settings.active_ttl_s),
            self._ms(self.settings.cleaned_ttl_s),
            release,
            *(version for _, version in flushed),
        ]
        with translate_errors("acknowledging a flush"):
            reply = self._call(self.scripts.ack_flush, keys, args)
        _, values = check_code("ack_flush", reply, OK)
        return Acked(int(values[0]), int(values[1]), bool(values[2]))

    def mark_flushing(self, read: Sequence[tuple[str, int]]) -> list[int | None]:
        """A flush is about to write these ``(key name, version read)`` to Postgres: per
        session, the highest version its copy knows reached (or was being written to)
        Postgres before now, ``None`` when it cannot tell (a hash an earlier build saved),
        or :data:`MOVED_ON` when it changed since it was read (not to be written now: it
        stays dirty). Runs over ``maxmemory``."""
        if not read:
            return []
        keys = [name for name, _ in read]
        with translate_errors("marking a flush"):
            reply = self._call(self.scripts.mark_flushing, keys, [version for _, version in read])
        _, values = check_code("mark_flushing", reply, OK)
        return [None if int(value) == _UNKNOWN else int(value) for value in values]

    def begin_flush(
        self, shard: int, token: str, ttl_ms: int, *, delay_ms: int, limit: int
    ) -> list[DirtyEntry] | None:
        """Take the shard's flush lock for ``token`` (or extend it) and list up to ``limit``
        entries that first became dirty at least ``delay_ms`` ago by Redis's clock, oldest
        first; ``None`` when another holder has the lock. One round trip."""
        keys = [self.keys.flush_lock(shard), self.keys.dirty(shard)]
        with translate_errors("starting a flush"):
            reply = self._call(self.scripts.begin_flush, keys, [token, ttl_ms, delay_ms, limit])
        code, values = check_code("begin_flush", reply, OK_OR_NOOP)
        if code is Code.NOOP:
            return None
        pairs = zip(values[::2], values[1::2], strict=True)
        return [DirtyEntry(name.decode(), int(since)) for name, since in pairs]

    def quarantine(
        self, shard: int, name: str, version: int, reason: str, *, force: bool = False
    ) -> bool:
        """Park a session Postgres refused in the shard's poison hash, with the reason.

        Only if it is still at ``version`` (``False`` if it moved on: the next flush tries
        the new version), unless ``force`` (for a value that cannot even be decoded).
        """
        keys = [self.keys.dirty(shard), self.keys.poison(shard), name]
        args: list[Any] = [version, reason[:2000], "1" if force else ""]
        with translate_errors("quarantining a session"):
            reply = self.scripts.quarantine(keys=keys, args=args)
        code, _ = check_code("quarantine", reply, OK_OR_NOOP)
        return code is Code.OK

    def mark_dirty(self, name: str) -> None:
        """Put a session back on its shard's backlog (the audit's repair): the next flush
        writes it (or finds it written) and its acknowledgement gives it its TTL."""
        shard = self.keys.shard_of_key(self.keys.parse_session(name))
        now_ms = self.server_time_ms()
        with translate_errors("marking a session dirty"):
            self.client.zadd(self.keys.dirty(shard), {name: now_ms}, nx=True)

    def retry_poisoned(
        self, name: str, *, keep_redis: bool = False, postgres_version: int | None = None
    ) -> bool:
        """Send a parked session back to the flush; ``False`` if it was not parked. With
        ``keep_redis``, this copy replaces Postgres's row (``postgres_version``, when known):
        its version is bumped past both and counts as known, so the fence lets it through."""
        key = self.keys.parse_session(name)
        shard = self.keys.shard_of_key(key)
        keys = [self.keys.dirty(shard), self.keys.poison(shard), name]
        args = ["1" if keep_redis else "", "" if postgres_version is None else postgres_version]
        with translate_errors("retrying a parked session"):
            reply = self.scripts.retry_poisoned(keys=keys, args=args)
        return check_code("retry_poisoned", reply, OK_OR_NOOP)[0] is Code.OK

    def drop_poisoned(self, name: str) -> bool:
        """Delete a parked session's Redis copy (Postgres's copy, if any, is read back on the
        next entry); ``False`` if it was not parked."""
        key = self.keys.parse_session(name)
        shard = self.keys.shard_of_key(key)
        run_set = self.keys.owner_sessions(key.owner)
        keys = [self.keys.dirty(shard), self.keys.poison(shard), name, run_set]
        with translate_errors("dropping a parked session"):
            reply = self.scripts.drop_poisoned(keys=keys, args=[])
        return check_code("drop_poisoned", reply, OK_OR_NOOP)[0] is Code.OK

    def poison(self, shard: int) -> dict[str, str]:
        """The shard's poison hash: session key name → why Postgres refused it."""
        with translate_errors("reading the poison hash"):
            raw = cast(dict[bytes, bytes], self.client.hgetall(self.keys.poison(shard)))
        return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}

    def poison_sizes(self, shards: Sequence[int]) -> dict[int, int]:
        """How many sessions each shard's poison hash holds (only shards with some)."""
        with translate_errors("reading poison sizes"):
            pipe = self.client.pipeline(transaction=False)
            for shard in shards:
                pipe.hlen(self.keys.poison(shard))
            sizes: list[Any] = pipe.execute()
        return {shard: int(n) for shard, n in zip(shards, sizes, strict=True) if n}

    def shard_backlog(self, shards: Sequence[int]) -> list[tuple[int, int, int | None]]:
        """``(shard, dirty count, oldest first-dirty time in ms or None)`` in one round trip
        (the flush trigger's pass: raw commands, no client bookkeeping per shard)."""
        commands: list[tuple[str, ...]] = []
        for shard in shards:
            dirty = self.keys.dirty(shard)
            commands += [("ZCARD", dirty), ("ZRANGE", dirty, "0", "0", "WITHSCORES")]
        with translate_errors("reading shard backlogs"):
            replies = self._reads(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise StoreUnavailable(f"reading shard backlogs: {reply}") from reply
        return [
            (shard, int(count), _score(oldest))
            for shard, count, oldest in zip(shards, replies[::2], replies[1::2], strict=True)
        ]

    def take_lock(self, shard: int, token: str, ttl_ms: int) -> bool:
        """Take the shard's flush lock for ``token``, or extend it if ``token`` holds it;
        ``False`` when another holder has it. Runs even when Redis is over ``maxmemory``."""
        with translate_errors("taking a flush lock"):
            reply = self.scripts.take_lock(keys=[self.keys.flush_lock(shard)], args=[token, ttl_ms])
        return check_code("take_lock", reply, OK_OR_NOOP)[0] is Code.OK

    def release_lock(self, shard: int, token: str) -> bool:
        """Release the shard's flush lock if ``token`` still holds it."""
        with translate_errors("releasing a flush lock"):
            reply = self.scripts.release_lock(keys=self._lock_keys(shard), args=[token])
        return check_code("release_lock", reply, OK_OR_NOOP)[0] is Code.OK

    def wait_lock_free(self, shard: int, timeout_s: float) -> None:
        """Block until a holder releases the shard's flush lock or ``timeout_s`` passes
        (whichever first; the lock may be taken again by then)."""
        with translate_errors("waiting for a flush lock"):
            self.client.blpop([self.keys.flush_lock_free(shard)], timeout=timeout_s)

    def _lock_keys(self, shard: int) -> list[str]:
        return [self.keys.flush_lock(shard), self.keys.flush_lock_free(shard)]

    def note_trigger_pass(self, trigger: str, at_ms: int) -> None:
        """Record that the flush trigger ``trigger`` (``host:pid``) passed at ``at_ms`` (Redis
        time); records of triggers silent for :data:`TRIGGER_RECORD_KEEP_MS` are dropped."""
        with translate_errors("recording a flush trigger pass"):
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(self.keys.triggers, {trigger: at_ms})
            pipe.zremrangebyscore(self.keys.triggers, "-inf", at_ms - TRIGGER_RECORD_KEEP_MS)
            pipe.execute()

    def forget_trigger(self, trigger: str) -> None:
        """A trigger that stops removes its record."""
        with translate_errors("removing a flush trigger record"):
            self.client.zrem(self.keys.triggers, trigger)

    def trigger_passes(self) -> dict[str, int]:
        """Each flush trigger (``host:pid``) seen within the last hour → its last pass (ms)."""
        with translate_errors("reading flush trigger records"):
            raw = self.client.zrange(self.keys.triggers, 0, -1, withscores=True)
        return {member.decode(): int(score) for member, score in cast(list[Any], raw)}

    def count(self, **increments: int) -> None:
        """Add to the key space's counters (``<prefix>:stats``), e.g. ``rows_flushed=12``.

        Best effort over ``maxmemory``: counters must never stop a flush that frees memory.
        """
        nonzero = {name: by for name, by in increments.items() if by}
        if not nonzero:
            return
        try:
            with translate_errors("counting"):
                pipe = self.client.pipeline(transaction=False)
                for name, by in nonzero.items():
                    pipe.hincrby(self.keys.stats, name, by)
                pipe.execute()
        except StoreOutOfMemory:
            log.debug("counters %s not recorded: Redis is over maxmemory", nonzero)

    def counters(self) -> dict[str, int]:
        """The key space's counters."""
        with translate_errors("reading counters"):
            raw = cast(dict[bytes, bytes], self.client.hgetall(self.keys.stats))
        return {k.decode(): int(v) for k, v in raw.items()}


def _score(reply: Any) -> int | None:
    """The score of a one-member ``ZRANGE ... WITHSCORES`` reply: ``[[member, score]]`` as
    hiredis pairs it, or ``[member, score]`` flat; ``None`` when the set is empty."""
    if not reply:
        return None
    pair = reply[0] if isinstance(reply[0], list) else reply
    return int(float(pair[1]))
