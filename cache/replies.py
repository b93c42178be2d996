"""What the hot store's calls answer: :class:`Loaded` (a load), :class:`Retired` (a retire),
:class:`EndedOwner` (an owner's end) and the shapes of its bulk reads."""

from __future__ import annotations

from dataclasses import dataclass

from cache.errors import CorruptValue
from cache.records import SessionKey, SessionStatus, StoredSession


@dataclass(frozen=True, slots=True)
class Loaded:
    """What ``load`` found: the stored record (any status) and the resumable session.

    ``owner_state`` is ``open``, ``ended`` or ``""`` when Redis has no marker of the run (lost,
    evicted, or a run nothing was saved in yet): then only Postgres can tell whether it ended.
    """

    record: StoredSession | None
    run_ended: bool = False
    owner_state: str = "open"
    current_config: str | None = None
    """A conversation's: the config snapshot its agent's session was last saved with (the
    owner hash's ``config:<binding>:<agent>``), or ``None`` when Redis does not know."""

    @property
    def owner_known(self) -> bool:
        return self.owner_state != ""

    @property
    def session(self) -> StoredSession | None:
        """The session if it may be resumed (``active`` in a run not ended), else ``None``."""
        record = self.record
        if record is None or self.run_ended or record.status is not SessionStatus.ACTIVE:
            return None
        return record

    @property
    def version(self) -> int:
        """The stored version (0 when absent): pass it as ``expected_version`` to save."""
        return self.record.version if self.record is not None else 0


@dataclass(frozen=True, slots=True)
class Retired:
    """What ``retire`` did: the session's new version, and its status: ``cleaned``, or
    ``cleaning`` when its owner has ended (the backend must still delete its layers)."""

    version: int
    status: SessionStatus


@dataclass(frozen=True, slots=True)
class EndedOwner:
    """The sessions of an owner that ``end_owner`` found, and whether it had already ended."""

    keys: tuple[SessionKey, ...]
    already_ended: bool


FieldsRead = tuple[SessionKey, list[bytes | None]] | CorruptValue | None
"""One session's entry in :meth:`RedisSessionCache.read_fields`."""
SessionRead = StoredSession | CorruptValue | None
