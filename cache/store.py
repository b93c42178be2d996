"""``RedisSessionCache``: the hot store. One round trip per load and per save.

Every mutation is one Lua script (``lua/<method>.lua``) over keys of one shard, so each is
atomic and runs unchanged on Redis Cluster.

Which connection a call uses, the one rule: a call made once per loop iteration or once per
flushed batch goes through :meth:`_reads` (read-only commands) or :meth:`_call` (a script),
which use this thread's pinned :class:`~cache.wire.Wire` on a standalone Redis: ``load``,
``save``, ``read_fields``, ``begin_flush``, ``mark_flushing``, ``ack_flush``. Every other
call (once per owner, per cleanup, per operator command) uses ``self.client`` as redis-py
gives it; its cost per call does not matter there, and its pool is what a cluster needs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from random import getrandbits
from typing import Any, cast

import redis

from cache.client import RedisClient, translate_errors
from cache.codec import Codec
from cache.errors import (
    CorruptValue,
    InvalidInput,
    Refused,
    StoreUnavailable,
)
from cache.flush_side import FlushSide
from cache.keys import KeySpace
from cache.metrics import LOADS, REFUSALS, RETIRES, SAVES
from cache.records import (
    OWNER_ENDS,
    ClosedBy,
    Owner,
    SessionKey,
    SessionStatus,
    SessionWrite,
    StoredSession,
    check_write_fits,
)
from cache.replies import EndedOwner, FieldsRead, Loaded, Retired, SessionRead
from cache.scripts import OK, OK_OR_NOOP, Code, Scripts, check_code
from cache.server_checks import check_layout, check_server_config
from cache.settings import Settings
from cache.validate import check_optional_id, check_version, storable_text
from cache.wire import Wire

_SAVE = frozenset(
    {Code.OK, Code.OWNER_ENDED, Code.VERSION_CONFLICT, Code.BACKLOG_FULL, Code.OWNER_UNKNOWN}
)
_END = frozenset({Code.OK, Code.OWNER_ENDED})
_RETIRE = frozenset({Code.OK, Code.NOOP, Code.OWNER_UNKNOWN})
_FILL = frozenset({Code.OK, Code.EXISTS})
_OPEN = _FILL
_CLEANUP_CHUNK = 500
_LOADED_FROM_REDIS = LOADS.labels("redis")
_LOAD_MISSED = LOADS.labels("miss")


log = logging.getLogger(__name__)


def new_content_id() -> str:
    """A save's content id: 64 random bits as 16 hex characters (0.2 us; an identity, not a
    secret). The fence tells two saves of one version apart by it; the save that creates a
    session makes it the session's lineage too."""
    return f"{getrandbits(64):016x}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisSessionCache(FlushSide):
    """Typed access to the session hashes, run markers and dirty sets of one key space."""

    def __init__(
        self, client: RedisClient, settings: Settings | None = None, *, read_only: bool = False
    ) -> None:
        """``read_only``: for commands that must write nothing (the shard count of an unused
        key space is checked, not recorded); it does not stop the caller's own writes."""
        self.settings = settings or Settings()
        self.client = client
        self.keys = KeySpace(self.settings.key_prefix, self.settings.shards)
        self.codec = Codec(self.settings.max_snapshot_bytes, self.settings.max_specs_bytes)
        self.scripts = Scripts.register(client)
        self.wire = Wire(client) if isinstance(client, redis.Redis) else None
        check_layout(client, self.keys, record=not read_only)
        check_server_config(client, self.settings.redis_url)

    def close(self) -> None:
        """Close the client and the wire's pinned connections."""
        if self.wire is not None:
            self.wire.close()
        self.client.close()

    def _ms(self, seconds: float) -> int:
        return int(seconds * 1000)

    # --- reads -------------------------------------------------------------------------

    def load(self, key: SessionKey) -> Loaded:
        """The stored session of ``key`` and its run's state: one round trip, two native
        commands (``HGETALL`` of the session, ``HGET`` of the run's state), no script.

        A load renews no TTL: a clean session that expires between a node's entry and its
        exit is read back from Postgres by the save (``workers.readthrough.save_through``).
        """
        names = self.keys.names(key)
        owner = ("HMGET", names.owner, "state", names.config_field) if names.config_field else None
        commands = [("HGETALL", names.session), owner or ("HGET", names.owner, "state")]
        with translate_errors(f"loading {names.session}"):
            fields, state = self._reads(commands)
        for reply in (fields, state):
            if isinstance(reply, Exception):
                raise StoreUnavailable(f"loading {names.session}: {reply}") from reply
        current = None
        if owner is not None:
            state, config = state
            current = config.decode() if config else None
        owner_state = state.decode() if state else ""
        if not fields:
            _LOAD_MISSED.inc()
            return Loaded(None, owner_state == "ended", owner_state, current)
        _LOADED_FROM_REDIS.inc()
        raw = (
            fields
            if isinstance(fields, dict)
            else dict(zip(fields[::2], fields[1::2], strict=True))
        )
        record = self.codec.decode_session(names.session, key, raw)
        return Loaded(record, owner_state == "ended", owner_state, current)

    def read_many(self, names: Sequence[str]) -> list[SessionRead]:
        """Sessions by key name in one pipeline; a corrupt one is returned, not raised."""
        with translate_errors("reading sessions"):
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(name)
            replies: list[Any] = pipe.execute()
        return [self._decode(name, raw) for name, raw in zip(names, replies, strict=True)]

    def _decode(self, name: str, raw: dict[bytes, bytes]) -> SessionRead:
        if not raw:
            return None
        try:
            key = self.keys.parse_session(name)
            return self.codec.decode_session(name, key, raw)
        except CorruptValue as exc:
            return exc
        except InvalidInput as exc:
            return CorruptValue(name, "<key>", str(exc))

    def read_fields(self, names: Sequence[str], fields: Sequence[str]) -> list[FieldsRead]:
        """``HMGET`` of ``fields`` of every named session hash, in one round trip: each
        session's key and values in ``fields`` order; ``None`` for a hash that holds none
        of them (gone); a :class:`CorruptValue` for a name or a key that is not a session's."""
        commands = [("HMGET", name, *fields) for name in names]
        with translate_errors("reading sessions"):
            replies = self._reads(commands)
        return [self._fields(name, reply) for name, reply in zip(names, replies, strict=True)]

    def _reads(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Read-only ``commands`` in one round trip, on this thread's pinned connection when
        there is one (resent once after a lost connection); a reply that is an error comes
        back as the exception instance."""
        if self.wire is not None:
            return self.wire.run(commands, retry=True)
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute(raise_on_error=False)

    def _fields(self, name: str, reply: Any) -> FieldsRead:
        if isinstance(reply, redis.ResponseError):
            return CorruptValue(name, "<hash>", str(reply))
        if isinstance(reply, Exception):
            raise StoreUnavailable(f"reading {name}: {reply}") from reply
        if not any(reply):
            return None
        try:
            return self.keys.parse_session(name), reply
        except InvalidInput as exc:
            return CorruptValue(name, "<key>", str(exc))

    def missing(self, keys: Sequence[SessionKey]) -> list[SessionKey]:
        """The keys among ``keys`` that have no session hash in Redis (one pipeline)."""
        with translate_errors("checking sessions"):
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self.keys.session(key))
            found: list[Any] = pipe.execute()
        return [key for key, exists in zip(keys, found, strict=True) if not exists]

    def owner_sessions(self, owner: Owner) -> list[SessionKey]:
        """The keys of every session the owner has saved (while its markers live)."""
        with translate_errors("listing owner sessions"):
            members = cast(set[bytes], self.client.smembers(self.keys.owner_sessions(owner)))
        return self._owner_members(owner, members)

    def _owner_members(self, owner: Owner, members: Iterable[bytes]) -> list[SessionKey]:
        """The keys of an owner set's members, sorted (a key listed in both member forms once)."""
        found = {self.keys.parse_owner_member(owner, member) for member in members}
        return sorted(found, key=SessionKey.sort_key)

    def owner_state(self, owner: Owner) -> dict[str, str]:
        """The owner hash (``state``, ``opened_at``, ``ended_at``, ``outcome``) as text."""
        with translate_errors("reading owner state"):
            raw = cast(dict[bytes, bytes], self.client.hgetall(self.keys.owner(owner)))
        return {k.decode(): v.decode() for k, v in raw.items()}

    # --- writes --------------------------------------------------------------------------

    def save(
        self,
        key: SessionKey,
        write: SessionWrite,
        *,
        expected_version: int | None = None,
        verify_run: bool = False,
    ) -> int:
        """Write the session as ``active`` and dirty; return its new version.

        Raises :class:`RunEnded`, :class:`VersionConflict` or :class:`BacklogFull` with
        nothing written. ``expected_version=0`` means "only if there is no session yet".
        When Redis has no marker of the run, the save opens the run, unless ``verify_run``:
        then it raises :class:`RunUnknown` (``workers.readthrough.save_through`` asks
        Postgres whether the run ended, which this layer cannot).
        """
        keys, args = self.save_call(
            key, write, expected_version=expected_version, verify_run=verify_run
        )
        name = keys[0]
        with translate_errors(f"saving {name}"):
            reply = self._call(self.scripts.save, keys, args)
        try:
            _, values = check_code("save", reply, _SAVE, key=name, expected=expected_version or 0)
        except Refused as exc:
            REFUSALS.labels(type(exc).__name__).inc()
            raise
        SAVES.inc()
        return int(values[0])

    def save_call(
        self,
        key: SessionKey,
        write: SessionWrite,
        *,
        expected_version: int | None = None,
        verify_run: bool = False,
    ) -> tuple[list[str], list[Any]]:
        """The validated ``KEYS`` and ``ARGV`` of a ``save`` (to pipeline many: bulk loads)."""
        if expected_version is not None:
            check_version("expected_version", expected_version)
        check_write_fits(key, write)
        fields = self.codec.write_values(write)
        names = self.keys.names(key)
        keys = [names.session, names.owner, names.owner_sessions, names.dirty]
        args: list[Any] = [
            "" if expected_version is None else expected_version,
            self.settings.max_dirty_per_shard,
            new_content_id(),
            self._ms(self.settings.active_ttl_s),
            "" if verify_run else "open",
            names.config_field,
            key.config_id,
            *fields,
        ]
        return keys, args

    def retire(self, key: SessionKey, failed_backend_run_id: str | None = None) -> Retired | None:
        """``active`` → ``cleaned`` after a failed backend run, or ``cleaning`` when its
        owner has ended (its layers still need the backend's cleanup); ``None`` if nothing
        changed. :class:`RunUnknown` when Redis has no marker of the owner."""
        check_optional_id("failed_backend_run_id", failed_backend_run_id)
        names = self.keys.names(key)
        with translate_errors(f"retiring {names.session}"):
            reply = self.scripts.retire(
                keys=[names.session, names.dirty, names.owner], args=[failed_backend_run_id or ""]
            )
        code, values = check_code("retire", reply, _RETIRE, key=names.session)
        if code is not Code.OK:
            return None
        RETIRES.inc()
        return Retired(int(values[0]), SessionStatus(_text(values[1])))

    def end_owner(self, owner: Owner, outcome: str) -> EndedOwner:
        """Mark the owner ended (every later save is refused) and list its sessions."""
        if outcome not in owner.owner_type.outcomes:
            raise InvalidInput(
                f"outcome must be one of {sorted(owner.owner_type.outcomes)}, got {outcome!r}"
            )
        keys = [self.keys.owner(owner), self.keys.owner_sessions(owner)]
        args: list[Any] = [outcome]
        with translate_errors("ending an owner"):
            reply = self.scripts.end_owner(keys=keys, args=args)
        code, members = check_code("end_owner", reply, _END)
        found = self._owner_members(owner, members)
        return EndedOwner(tuple(found), already_ended=code is Code.OWNER_ENDED)

    def open_owner(self, owner: Owner) -> bool:
        """Mark the owner open if Redis has no marker of it (Postgres says it did not end)."""
        args: list[Any] = [self._ms(self.settings.active_ttl_s)]
        with translate_errors("opening an owner"):
            reply = self.scripts.open_owner(keys=[self.keys.owner(owner)], args=args)
        return check_code("open_owner", reply, _OPEN)[0] is Code.OK

    def settle_owner(self, owner: Owner) -> bool:
        """Every session of the ended owner is cleaned: its markers get ``ended_run_ttl_s``."""
        keys = [self.keys.owner(owner), self.keys.owner_sessions(owner)]
        with translate_errors("settling an owner"):
            reply = self.scripts.settle_owner(
                keys=keys, args=[self._ms(self.settings.ended_run_ttl_s)]
            )
        return check_code("settle_owner", reply, OK_OR_NOOP)[0] is Code.OK

    def note_cleanup(self, key: SessionKey, cleanup_run_id: str, attempt: int) -> bool:
        """Remember the backend run of a cleanup attempt (only while the session is cleaning)."""
        check_optional_id("cleanup_run_id", cleanup_run_id)
        with translate_errors("noting a cleanup run"):
            reply = self.scripts.note_cleanup(
                keys=[self.keys.session(key)], args=[cleanup_run_id, attempt]
            )
        return check_code("note_cleanup", reply, OK_OR_NOOP)[0] is Code.OK

    def cleanup_state(self, key: SessionKey) -> tuple[str | None, int]:
        """The remembered cleanup run of a session and its attempt number (``note_cleanup``)."""
        with translate_errors("reading a cleanup run"):
            reply = self.client.hmget(self.keys.session(key), ["cleanup_run_id", "cleanup_attempt"])
        run_id, attempt = cast(list[bytes | None], reply)
        try:
            number = int(attempt) if attempt else 0
        except ValueError:
            number = 0
        return (run_id.decode(errors="replace") if run_id else None), number

    def begin_cleanup(
        self,
        owner: Owner,
        keys: Iterable[SessionKey],
        *,
        closed_by: ClosedBy | None = None,
        idle_s: float | None = None,
    ) -> int:
        """Move every ``active`` session of ``owner`` among ``keys`` to ``cleaning``.

        Without ``closed_by`` the owner has ended (its end closes them); with one (a
        conversation's ``config_change`` or ``idle``) only these sessions are retired. With
        ``idle_s``, a session saved within the last ``idle_s`` seconds (by Redis's clock) or
        waiting for human input is left active: checked in the script, so a save racing the
        sweep wins."""
        names = [self.keys.session(self._of_owner(owner, key)) for key in keys]
        dirty = self.keys.dirty(self.keys.shard_of_owner(owner))
        run_set = self.keys.owner_sessions(owner)
        moved = 0
        closer = closed_by or owner.owner_type.end_closer
        args: list[Any] = [
            self._ms(self.settings.cleaned_ttl_s),
            closer.value,
            "1" if closer in OWNER_ENDS else "",
            "" if idle_s is None else self._ms(idle_s),
        ]
        for start in range(0, len(names), _CLEANUP_CHUNK):
            chunk = names[start : start + _CLEANUP_CHUNK]
            with translate_errors("beginning cleanup"):
                reply = self.scripts.begin_cleanup(keys=[dirty, run_set, *chunk], args=args)
            moved += int(check_code("begin_cleanup", reply, OK)[1][0])
        return moved

    def mark_cleaned(
        self, key: SessionKey, *, cleanup_run_id: str | None = None, error: str | None = None
    ) -> int | None:
        """``cleaning`` → ``cleaned``; ``None`` if the session was not cleaning."""
        check_optional_id("cleanup_run_id", cleanup_run_id)
        name = self.keys.session(key)
        args: list[Any] = [cleanup_run_id or "", storable_text(error or "", 2000)]
        with translate_errors(f"marking {name} cleaned"):
            reply = self.scripts.mark_cleaned(keys=[name, self._dirty_of(key)], args=args)
        code, values = check_code("mark_cleaned", reply, OK_OR_NOOP, key=name)
        return int(values[0]) if code is Code.OK else None

    def _call(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """``EVALSHA`` on this thread's pinned connection when there is one (a loop's saves,
        each flusher thread's scripts), else through the client."""
        if self.wire is not None:
            return self.wire.evalsha(script, keys, args)
        return script(keys=keys, args=args)

    def fill(self, session: StoredSession, *, behind: bool = False) -> bool:
        """Write a session read from Postgres if Redis has none (or, with ``behind``, holds a
        clean copy of an older version); ``False`` if Redis keeps its own."""
        keys = [self.keys.session(session.key), self.keys.owner_sessions(session.key.owner)]
        clean = dataclasses.replace(session, flushed_version=session.version)
        args: list[Any] = [
            self._ms(self.settings.active_ttl_s),
            "behind" if behind else "",
            *self.codec.stored_fields(clean),
        ]
        with translate_errors("filling a session"):
            reply = self.scripts.fill(keys=keys, args=args)
        code, _ = check_code("fill", reply, _FILL)
        return code is Code.OK

    def _dirty_of(self, key: SessionKey) -> str:
        return self.keys.dirty(self.keys.shard_of_key(key))

    @staticmethod
    def _of_owner(owner: Owner, key: SessionKey) -> SessionKey:
        if key.owner != owner:
            raise InvalidInput(f"session {key} does not belong to {owner}")
        return key
