"""The one place that builds Redis key names (DESIGN §3): the store's (:class:`KeySpace`)
and the queue Redis's markers of flush and cleanup jobs (the functions at the end).

Every key of an owner carries the owner's shard as a hash tag (``{s042}``), so every
script's keys share one Redis Cluster slot. IDs are percent-encoded outside
``[A-Za-z0-9._-]``: ``:`` can then separate parts, and a key can be parsed back into its IDs.
"""

from __future__ import annotations

import functools
import hashlib
import re
import zlib
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, unquote

from cache.errors import InvalidId
from cache.records import Owner, OwnerType, SessionKey

_KEY_PART = re.compile(r"^[A-Za-z0-9._%-]+$")


@functools.lru_cache(maxsize=65_536)
def encode_id(value: str) -> str:
    """Percent-encode every character outside ``[A-Za-z0-9._-]`` (cached: IDs repeat a lot)."""
    return quote(value, safe="").replace("~", "%7E")


def decode_id(value: str) -> str:
    if not _KEY_PART.match(value):
        raise InvalidId(f"not an encoded ID: {value!r}")
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError as exc:
        raise InvalidId(f"not an encoded ID: {value!r}") from exc


@functools.lru_cache(maxsize=65_536)
def _parse_session(space: KeySpace, text: str) -> SessionKey:
    return space._parse_session(text)


class SessionNames(NamedTuple):
    """Every key name a save of one session touches."""

    session: str
    owner: str
    owner_sessions: str
    dirty: str
    config_field: str
    """A conversation session's field in its owner hash, ``config:<binding>:<agent>``: the
    config snapshot the agent's session was last saved with (``""`` for a workflow run's)."""


@functools.lru_cache(maxsize=65_536)
def _names(space: KeySpace, key: SessionKey) -> SessionNames:
    owner = space.owner(key.owner)
    dirty = space.dirty(space.shard_of_key(key))
    field = ""
    if key.owner_type is OwnerType.CONVERSATION:
        field = f"config:{encode_id(key.binding_id)}:{encode_id(key.agent_id)}"
    return SessionNames(space.session(key), owner, f"{owner}:sessions", dirty, field)


_SESSION_WORD: dict[OwnerType, str] = {
    OwnerType.WORKFLOW_RUN: "session",
    OwnerType.CONVERSATION: "conversation-session",
}
_OWNER_WORD: dict[OwnerType, str] = {
    OwnerType.WORKFLOW_RUN: "run",
    OwnerType.CONVERSATION: "conversation",
}
_OWNER_OF_SESSION_WORD = {word: owner for owner, word in _SESSION_WORD.items()}


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Key names for one prefix and shard count."""

    prefix: str = "asc"
    shards: int = 256

    def names(self, key: SessionKey) -> SessionNames:
        """The session's key names, built once per session (a loop asks every iteration)."""
        return _names(self, key)

    @property
    def meta(self) -> str:
        return f"{self.prefix}:meta"

    @property
    def stats(self) -> str:
        """Counters of the whole key space (flushed rows, poisoned rows, cleanups)."""
        return f"{self.prefix}:stats"

    @property
    def triggers(self) -> str:
        """Sorted set: each flush trigger (``host:pid``) → when it last passed (ms, Redis time)."""
        return f"{self.prefix}:triggers"

    def session_patterns(self) -> tuple[str, ...]:
        """``SCAN MATCH`` patterns of every session hash of the key space (both owners)."""
        return tuple(f"{self.prefix}:{{s*}}:{word}:*" for word in _SESSION_WORD.values())

    def shard_of(self, tenant_id: str, workflow_run_id: str) -> int:
        return zlib.crc32(f"{tenant_id}:{workflow_run_id}".encode()) % self.shards

    def tag(self, shard: int) -> str:
        return f"{{s{shard:03d}}}"

    def _base(self, shard: int) -> str:
        return f"{self.prefix}:{self.tag(shard)}"

    def session(self, key: SessionKey) -> str:
        """``<prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>`` (a workflow
        run's) or ``<prefix>:{sNNN}:conversation-session:<tenant>:<conversation>:<binding>:
        <agent>:<config>`` (a conversation's): the name says the owner."""
        shard = self.shard_of(key.tenant_id, key.owner_id)
        parts = ":".join(encode_id(part) for part in key.parts())
        return f"{self._base(shard)}:{_SESSION_WORD[key.owner_type]}:{parts}"

    def owner(self, owner: Owner) -> str:
        """The owner's marker: ``<prefix>:{sNNN}:run:<tenant>:<run>`` (a workflow run's) or
        ``<prefix>:{sNNN}:conversation:<tenant>:<conversation>``."""
        shard = self.shard_of(owner.tenant_id, owner.owner_id)
        ids = f"{encode_id(owner.tenant_id)}:{encode_id(owner.owner_id)}"
        return f"{self._base(shard)}:{_OWNER_WORD[owner.owner_type]}:{ids}"

    def owner_sessions(self, owner: Owner) -> str:
        return f"{self.owner(owner)}:sessions"

    def owner_member(self, key: SessionKey) -> str:
        """The session's member in its owner's session set: ``<node>:<binding>:<agent>``
        (a workflow run's) or ``<binding>:<agent>:<config>`` (a conversation's).

        The set's name already says the tenant and owner, so the member leaves them out (the
        scripts derive it from the session's name: its last three ``:``-separated parts)."""
        return ":".join(encode_id(part) for part in key.parts()[2:])

    def parse_owner_member(self, owner: Owner, member: str | bytes) -> SessionKey:
        """The key an owner-set member stands for; a full session name (how sets written before
        the short members held them) is parsed as one."""
        text = member.decode() if isinstance(member, bytes) else member
        if text.startswith(f"{self.prefix}:{{"):
            key = self.parse_session(text)
            if key.owner != owner:
                raise InvalidId(f"session {text!r} is not of owner {owner}")
            return key
        pieces = text.split(":")
        if len(pieces) != 3:
            raise InvalidId(f"not an owner-set member: {text!r}")
        ids = (decode_id(piece) for piece in pieces)
        key = SessionKey.of_parts(owner.owner_type, owner.tenant_id, owner.owner_id, *ids)
        if self.owner_member(key) != text:  # not the one encoding of these IDs
            raise InvalidId(f"not an owner-set member: {text!r}")
        return key

    def dirty(self, shard: int) -> str:
        return f"{self._base(shard)}:dirty"

    def poison(self, shard: int) -> str:
        return f"{self._base(shard)}:poison"

    def flush_lock(self, shard: int) -> str:
        return f"{self._base(shard)}:flush_lock"

    def flush_lock_free(self, shard: int) -> str:
        """A list a release pushes one token onto (for a second), for a flush that waits for
        the lock to block on (BLPOP) instead of polling."""
        return f"{self._base(shard)}:flush_lock_free"

    def all_shards(self) -> range:
        return range(self.shards)

    def shard_of_key(self, key: SessionKey) -> int:
        return self.shard_of(key.tenant_id, key.owner_id)

    def shard_of_owner(self, owner: Owner) -> int:
        return self.shard_of(owner.tenant_id, owner.owner_id)

    def parse_session(self, name: str | bytes) -> SessionKey:
        """The :class:`SessionKey` a session key name was built from (cached: a flush parses
        the names of sessions it flushed before)."""
        return _parse_session(self, name.decode() if isinstance(name, bytes) else name)

    def _parse_session(self, text: str) -> SessionKey:
        head = f"{self.prefix}:{{s"
        pieces = text.split(":")
        owner = _OWNER_OF_SESSION_WORD.get(pieces[2]) if len(pieces) == 8 else None
        if not text.startswith(head) or owner is None:
            raise InvalidId(f"not a session key of prefix {self.prefix!r}: {text!r}")
        key = SessionKey.of_parts(owner, *(decode_id(part) for part in pieces[3:]))
        if self.session(key) != text:
            raise InvalidId(f"session key has the wrong shard tag: {text!r}")
        return key


# --- the queue Redis's markers (per prefix, not per shard: RQ keeps one Redis) -------------


def flush_pending(prefix: str, shard: int, *, urgent: bool) -> str:
    """Names the shard's flush job while it waits in the queue (``workers.queues``)."""
    return f"{prefix}:flush_pending:s{shard:03d}" + (":urgent" if urgent else "")


def flush_backoff(prefix: str) -> str:
    """Lives while Postgres was found unavailable: no flush job is requested meanwhile."""
    return f"{prefix}:flush_backoff"


def session_digest(session_name: str) -> str:
    """A session key name's SHA-1, hex: its cleanup markers' and jobs' short id."""
    return hashlib.sha1(session_name.encode()).hexdigest()  # noqa: S324 (a name, not a secret)


def cleanup_pending(prefix: str, session_name: str) -> str:
    """Names the session's cleanup job while one is under way (``workers.cleanup``)."""
    return f"{prefix}:cleanup_pending:{session_digest(session_name)}"


def cleanup_lease(prefix: str, session_name: str) -> str:
    """Held by the running cleanup attempt of the session (its value: the RQ job id)."""
    return f"{prefix}:cleanup_lease:{session_digest(session_name)}"
