"""``agent-sessions audit``: does Redis agree with Postgres, session by session?

Every session hash of the key prefix is read in batches (``SCAN``, then one pipeline per
batch for the hashes, their TTLs, dirty marks and poison entries, and one Postgres query per
batch for the rows), so memory stays bounded whatever the key space holds. Each session
lands in one finding:

======================  ========================================================  ======
finding                 meaning                                                   a fault
======================  ========================================================  ======
agree                   Postgres holds the Redis copy's version and content       no
behind_within_bound     dirty, and its oldest change is younger than the
                        delivery bound: the write-behind will get it there        no
behind_beyond_bound     dirty for longer than the delivery bound                  yes
missing_in_postgres     no row, though the copy is not dirty (or has waited past
                        the bound)                                                yes
same_version_other_     Postgres holds this version as another save: two
content                 histories                                                 yes
postgres_ahead          Postgres holds a newer version than a clean copy: Redis
                        went back, and the copy would be resumed                  yes
active_in_ended_owner   active though its owner ended (in Redis, or in Postgres
                        past the reconciler's grace and the delivery bound)       yes
terminal_without_ttl    cleaned, flushed, and with no TTL: it would never go      yes
poisoned                parked in the shard's poison hash (``poison list``)       yes
======================  ========================================================  ======

``--repair`` asks for what each fault needs and nothing else: an urgent flush of the shard
(behind, missing, terminal without TTL: the flush's acknowledgement gives the TTL), the
poison hash with both sides named (same version other content, postgres ahead: an operator
decides, ``poison retry --keep-redis`` or ``poison drop``), the owner's reconciliation (an
active session of an ended owner). A poisoned session already waits for an operator.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cache.errors import InvalidInput
from cache.records import Owner, SessionKey
from persistence.counts import RowBrief
from workers.context import WorkerContext
from workers.flush_policy import delivery_bound_ms

BATCH: Final = 500
EXAMPLES: Final = 10
"""Key names kept per finding, to show (the counts are exact)."""
HEALTHY: Final = frozenset({"agree", "behind_within_bound"})
FINDINGS: Final = (
    "agree",
    "behind_within_bound",
    "behind_beyond_bound",
    "missing_in_postgres",
    "same_version_other_content",
    "postgres_ahead",
    "active_in_ended_owner",
    "terminal_without_ttl",
    "poisoned",
)
_FIELDS: Final = ("status", "version", "flushed_version", "content_id")


@dataclass
class AuditReport:
    """How many sessions landed in each finding, a few names of each, what was repaired."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    repaired: Counter[str] = field(default_factory=Counter)

    @property
    def faults(self) -> int:
        return sum(n for finding, n in self.counts.items() if finding not in HEALTHY)

    def note(self, finding: str, name: str) -> None:
        self.counts[finding] += 1
        shown = self.examples.setdefault(finding, [])
        if len(shown) < EXAMPLES:
            shown.append(name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.faults == 0,
            "sessions": sum(self.counts.values()),
            "counts": {finding: self.counts.get(finding, 0) for finding in FINDINGS},
            "examples": {k: v for k, v in self.examples.items() if k not in HEALTHY},
            "repaired": dict(self.repaired),
        }


@dataclass(frozen=True, slots=True)
class _Copy:
    """What Redis holds of one session (one hash, its TTL, dirty mark and poison entry)."""

    name: str
    key: SessionKey
    status: str
    version: int
    flushed_version: int
    content_id: str | None
    pttl_ms: int
    dirty_since_ms: int | None
    poisoned: bool

    @property
    def dirty(self) -> bool:
        return self.version > self.flushed_version or self.dirty_since_ms is not None


def audit(
    ctx: WorkerContext, *, repair: bool = False, progress: Callable[[int], None] | None = None
) -> AuditReport:
    """Compare every session of the prefix in Redis with Postgres (see the module)."""
    report = AuditReport()
    auditor = _Auditor(ctx, report, repair)
    for names in _batches(ctx):
        auditor.batch(names)
        if progress is not None:
            progress(sum(report.counts.values()))
    auditor.postgres_side()
    return report


def _batches(ctx: WorkerContext) -> Iterator[list[str]]:
    client = ctx.cache.client
    for pattern in ctx.cache.keys.session_patterns():
        batch: list[str] = []
        for raw in client.scan_iter(match=pattern, count=BATCH):
            batch.append(raw.decode() if isinstance(raw, bytes) else str(raw))
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


class _Auditor:
    def __init__(self, ctx: WorkerContext, report: AuditReport, repair: bool) -> None:
        self.ctx, self.report, self.repair = ctx, report, repair
        self.bound_ms = delivery_bound_ms(ctx.settings)
        self.now_ms = ctx.cache.server_time_ms()
        self.flush_shards: set[int] = set()
        self.stopped_late: set[SessionKey] = set()
        """Sessions already found active in an ended owner (not counted again from Postgres)."""

    def batch(self, names: Sequence[str]) -> None:
        copies = self._read(names)
        rows = self.ctx.repo.briefs([copy.key for copy in copies])
        owners = {copy.key.owner for copy in copies}
        ended = self.ctx.repo.ended_owners(owners) | self._ended_in_redis(owners)
        for copy in copies:
            finding = self._finding(copy, rows.get(copy.key), copy.key.owner in ended)
            self.report.note(finding, copy.name)
            if finding == "active_in_ended_owner":
                self.stopped_late.add(copy.key)
            if self.repair:
                self._repair(finding, copy, rows.get(copy.key))
        self._flush_requested()

    def _finding(self, copy: _Copy, row: RowBrief | None, owner_ended: bool) -> str:
        if copy.poisoned:
            return "poisoned"
        if copy.status == "active" and owner_ended:
            return "active_in_ended_owner"
        return self._dirty(copy, row) if copy.dirty else _clean(copy, row)

    def _dirty(self, copy: _Copy, row: RowBrief | None) -> str:
        since = copy.dirty_since_ms if copy.dirty_since_ms is not None else self.now_ms
        if self.now_ms - since <= self.bound_ms:
            return "behind_within_bound"
        return "missing_in_postgres" if row is None else "behind_beyond_bound"

    def _read(self, names: Sequence[str]) -> list[_Copy]:
        cache = self.ctx.cache
        pipe = cache.client.pipeline(transaction=False)
        keys: list[SessionKey | None] = []
        for name in names:
            try:
                key: SessionKey | None = cache.keys.parse_session(name)
            except InvalidInput:
                key = None
            keys.append(key)
            shard = cache.keys.shard_of_key(key) if key is not None else 0
            pipe.hmget(name, list(_FIELDS))
            pipe.pttl(name)
            pipe.zscore(cache.keys.dirty(shard), name)
            pipe.hexists(cache.keys.poison(shard), name)
        replies = pipe.execute()
        copies = []
        for at, (name, key) in enumerate(zip(names, keys, strict=True)):
            fields, pttl, since, poisoned = replies[4 * at : 4 * at + 4]
            if key is None or fields[1] is None:
                continue  # gone since the scan, or not a session name
            status, version, flushed, content = (_text(v) for v in fields)
            copies.append(
                _Copy(
                    name,
                    key,
                    status or "",
                    int(version or 0),
                    int(flushed or 0),
                    content,
                    int(pttl),
                    None if since is None else int(since),
                    bool(poisoned),
                )
            )
        return copies

    def _ended_in_redis(self, owners: set[Owner]) -> set[Owner]:
        return {
            owner for owner in owners if self.ctx.cache.owner_state(owner).get("state") == "ended"
        }

    def _repair(self, finding: str, copy: _Copy, row: RowBrief | None) -> None:
        cache = self.ctx.cache
        shard = cache.keys.shard_of_key(copy.key)
        if finding in ("behind_beyond_bound", "missing_in_postgres", "terminal_without_ttl"):
            if not copy.dirty:
                cache.mark_dirty(copy.name)
            self.flush_shards.add(shard)
        elif finding in ("same_version_other_content", "postgres_ahead") and row is not None:
            why = (
                f"audit: postgres holds version {row.version} (content {row.content_id or '-'}), "
                f"this redis copy holds version {copy.version} (content {copy.content_id or '-'})"
            )
            cache.quarantine(shard, copy.name, copy.version, why, force=True)
        elif finding == "active_in_ended_owner":
            self.ctx.repo.recheck_owners([copy.key.owner])
        else:
            return
        self.report.repaired[finding] += 1

    def _flush_requested(self) -> None:
        for shard in sorted(self.flush_shards):
            self.ctx.request_flush(shard)
        self.flush_shards.clear()

    def postgres_side(self) -> None:
        """Active rows of owners that ended long enough ago that their end must have stopped
        them, whether or not Redis still holds them."""
        settings = self.ctx.settings
        grace_s = settings.reconcile_grace_s + self.bound_ms / 1000
        for key in self.ctx.repo.active_in_ended_owners(ended_before_s=grace_s, limit=1000):
            if key in self.stopped_late:
                continue
            self.report.note(
                "active_in_ended_owner", f"{self.ctx.cache.keys.session(key)} (postgres)"
            )
            if self.repair:
                self.ctx.repo.recheck_owners([key.owner])
                self.report.repaired["active_in_ended_owner"] += 1


def _clean(copy: _Copy, row: RowBrief | None) -> str:
    """A copy the flush acknowledged: Postgres must hold exactly it."""
    if row is None:
        return "missing_in_postgres"
    if row.version > copy.version:
        return "postgres_ahead"
    if row.version == copy.version and _differ(row.content_id, copy.content_id):
        return "same_version_other_content"
    if copy.status == "cleaned" and copy.pttl_ms == -1:
        return "terminal_without_ttl"
    return "agree"


def _differ(stored: str | None, held: str | None) -> bool:
    return bool(stored and held and stored != held)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
