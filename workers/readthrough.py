"""Read-through: what Redis lost, Postgres brings back (a session, a run's end, or both).

It sits above the cache so the layering holds (cache never imports persistence). A fill
carries the row's version and lineage, so a session's version never restarts and its history
stays recognisable. A run marker Redis lost is restored from ``agent_session_owners``: ended if
Postgres recorded the end, open otherwise, so nothing of an ended run becomes resumable or
saveable again because Redis forgot it.
"""

from __future__ import annotations

from cache.errors import RunUnknown, VersionConflict
from cache.metrics import LOADS
from cache.records import Owner, SessionKey, SessionStatus, SessionWrite
from cache.replies import Loaded, Retired
from cache.store import RedisSessionCache
from persistence.owners import OwnerEnd
from persistence.repository import SessionRepository

_LOADED_FROM_POSTGRES = LOADS.labels("postgres")


def restore_owner(cache: RedisSessionCache, owner: Owner, end: OwnerEnd | None) -> bool:
    """Put the owner's marker back as Postgres knows it; whether the owner has ended."""
    if end is None:
        cache.open_owner(owner)
        return False
    cache.end_owner(owner, end.outcome)
    if end.settled:
        cache.settle_owner(owner)
    return True


def load_through(cache: RedisSessionCache, repo: SessionRepository, key: SessionKey) -> Loaded:
    """The session of ``key`` and whether its run ended; Postgres answers what Redis lost.

    One Redis round trip when Redis has the session and its run's marker; otherwise one
    Postgres read (the row and the run's end record), then the fills. A session of an owner
    Postgres records as ended is never handed back ``active``: it goes to ``cleaning`` (the
    owner's reconciler is asked to visit now and has the backend clean it up).
    """
    loaded = cache.load(key)
    if loaded.record is not None and loaded.owner_known:
        return loaded
    row, end = repo.get_with_run(key)
    ended = loaded.run_ended or restore_owner(cache, key.owner, end)
    record = loaded.record
    if record is None and row is not None:
        _LOADED_FROM_POSTGRES.inc()
        if not cache.fill(row):
            return cache.load(key)
        record = row
    if ended and record is not None and record.status is SessionStatus.ACTIVE:
        cache.begin_cleanup(key.owner, [key])
        repo.recheck_owners([key.owner])
        return cache.load(key)
    return Loaded(record, ended, current_config=loaded.current_config)


def save_through(
    cache: RedisSessionCache,
    repo: SessionRepository,
    key: SessionKey,
    write: SessionWrite,
    *,
    expected_version: int | None,
) -> int:
    """``cache.save`` that asks Postgres what Redis lost, then saves once more.

    * Redis has no marker of the run: Postgres says whether it ended (then :class:`RunEnded`
      is raised with nothing written) and the marker is restored.
    * The session expected at ``expected_version`` vanished from Redis (an expired or
      evicted clean hash): it is read back from Postgres; if Postgres holds exactly that
      version the save goes ahead, else the :class:`VersionConflict` stands.
    """
    for attempt in range(3):
        try:
            return cache.save(key, write, expected_version=expected_version, verify_run=True)
        except RunUnknown:
            if attempt == 2:
                raise
            restore_owner(cache, key.owner, repo.end_of(key.owner))
        except VersionConflict as conflict:
            if attempt == 2 or conflict.actual != 0 or not expected_version:
                raise
            found = load_through(cache, repo, key).version
            if found != expected_version:
                raise VersionConflict(conflict.key, expected_version, found) from conflict
    raise AssertionError("unreachable: the last attempt returns or raises")


def retire_through(
    cache: RedisSessionCache, repo: SessionRepository, key: SessionKey, failed_run_id: str | None
) -> Retired | None:
    """``cache.retire`` that asks Postgres what Redis lost: the owner's marker (so an ended
    owner's session goes to ``cleaning``, never to a plain retire), and the session itself
    (an ``active`` row whose Redis hash expired is retired too, rather than resumed by the
    next entry). When the owner has ended, the reconciler is asked to visit it now: the
    session's layers need the backend's cleanup."""
    retired = _retire_knowing_the_owner(cache, repo, key, failed_run_id)
    if retired is None and load_through(cache, repo, key).session is not None:
        retired = _retire_knowing_the_owner(cache, repo, key, failed_run_id)
    if retired is not None and retired.status is SessionStatus.CLEANING:
        repo.recheck_owners([key.owner])
    return retired


def _retire_knowing_the_owner(
    cache: RedisSessionCache, repo: SessionRepository, key: SessionKey, failed_run_id: str | None
) -> Retired | None:
    try:
        return cache.retire(key, failed_run_id)
    except RunUnknown:
        restore_owner(cache, key.owner, repo.end_of(key.owner))
        return cache.retire(key, failed_run_id)
