"""What ``agent-sessions demo`` measured and proved: records, verification and the facts of
the report (:mod:`agent_sessions.demo.render` writes them as text).

The workload (``agent_sessions.demo``) records in :class:`Tracked` what it last wrote to every
session. Once the write-behind has drained, :func:`verify` checks that Postgres holds exactly
that final state, that Redis agrees with it, and that every cleanup ran on the backend.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from agent_sessions.testing.fake_backend import FakeRun
from cache.errors import CorruptValue
from cache.records import (
    ClosedBy,
    LayerSpec,
    Owner,
    OwnerType,
    SessionKey,
    SessionStatus,
    Snapshot,
    StoredSession,
)
from cache.replies import SessionRead
from cache.store import RedisSessionCache
from persistence.models import sessions
from persistence.repository import SessionRepository
from workers.cleanup import cleanup_idempotency_key, retirement_of


@dataclass
class Tracked:
    """What the demo last wrote to one session: what Postgres must end up holding."""

    version: int = 0
    snapshot: Snapshot | None = None
    specs: tuple[LayerSpec, ...] = ()
    retired_by: str | None = None
    paused: bool = False
    owner_end: ClosedBy = ClosedBy.WORKFLOW_END
    config_retired: bool = False
    """A conversation's turn with another config retired it (``closed_by=config_change``)."""

    @property
    def expected_version(self) -> int:
        """A session still active at its owner's end (or at a config change) gets two more
        writes: cleaning, cleaned."""
        return self.version if self.retired_by else self.version + 2

    @property
    def expected_closed_by(self) -> ClosedBy:
        if self.retired_by:
            return ClosedBy.BACKEND_FAILURE
        return ClosedBy.CONFIG_CHANGE if self.config_retired else self.owner_end


@dataclass
class WorkflowResult:
    """One workflow run, or one conversation, as the demo drove it."""

    run_id: str
    outcome: str = "succeeded"
    kind: OwnerType = OwnerType.WORKFLOW_RUN
    config_switches: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    """Per agent run, the wall time of ``enter`` plus ``finish``."""
    cpu_ms: list[float] = field(default_factory=list)
    """Per agent run, the CPU time the calling thread spent in ``enter`` plus ``finish``."""
    saves: int = 0
    retires: int = 0
    resumes: int = 0
    sessions: dict[SessionKey, Tracked] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def saved_sessions(self) -> dict[SessionKey, Tracked]:
        """The sessions that were written at least once (a first run may fail before any)."""
        return {key: tracked for key, tracked in self.sessions.items() if tracked.version}


@dataclass(frozen=True)
class Report:
    """Everything the demo prints; ``problems`` empty means verified."""

    facts: dict[str, object]
    problems: list[str]

    @property
    def verified(self) -> bool:
        return not self.problems

    def as_json(self) -> str:
        payload = {**self.facts, "verified": self.verified, "failures": self.problems}
        return json.dumps(payload, separators=(",", ":"))


# ---------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def p50_p99(values: Sequence[float], digits: int) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50), digits),
        "p99": round(percentile(values, 99), digits),
    }


@dataclass(frozen=True)
class TenantRows:
    """What Postgres holds for the demo's tenant, beyond the records ``verify`` reads."""

    flush_lags_s: list[float]
    cleanups_done: int
    cleanups_gave_up: int


def tenant_rows(repo: SessionRepository, tenant_id: str) -> TenantRows:
    """Per row: ``flushed_at - updated_at`` (the final version's lag) and how cleanup ended."""
    c = sessions.c
    query = sa.select(c.updated_at, c.flushed_at, c.closed_by, c.cleanup_error).where(
        c.tenant_id == tenant_id
    )
    with repo.engine.connect() as conn:
        rows = conn.execute(query).all()
    ended = [row for row in rows if row.closed_by not in (None, ClosedBy.BACKEND_FAILURE.value)]
    return TenantRows(
        flush_lags_s=[(row.flushed_at - row.updated_at).total_seconds() for row in rows],
        cleanups_done=sum(row.cleanup_error is None for row in ended),
        cleanups_gave_up=sum(row.cleanup_error is not None for row in ended),
    )


def counter_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {name: after.get(name, 0) - before.get(name, 0) for name in after}


def counter_problems(stats_key: str, delta: Mapping[str, int], sessions: int) -> list[str]:
    """Every session's final version is written at least once, so the count must show it."""
    rows = delta.get("rows_flushed", 0)
    if rows >= sessions:
        return []
    return [
        f"{stats_key}: rows_flushed grew by {rows}, fewer than the {sessions} sessions in "
        "Postgres; the flush jobs did not count their writes (see the worker log)"
    ]


# -------------------------------------------------------------------------- verification


def verify(
    cache: RedisSessionCache,
    repo: SessionRepository,
    fake: Mapping[str, FakeRun],
    tenant_id: str,
    results: Iterable[WorkflowResult],
) -> list[str]:
    """Every problem found with the demo's own runs, each naming its session key; ``fake``
    is every run the fake agent backend served, by id."""
    problems: list[str] = []
    for result in results:
        problems += result.problems
        problems += _run_problems(cache, repo, fake, tenant_id, result)
    return problems


def _run_problems(
    cache: RedisSessionCache,
    repo: SessionRepository,
    fake: Mapping[str, FakeRun],
    tenant_id: str,
    result: WorkflowResult,
) -> list[str]:
    expected = result.saved_sessions()
    owner = Owner(tenant_id, result.run_id, result.kind)
    rows = {row.key: row for row in repo.list_owner(owner)}
    keys = sorted(expected.keys() | rows.keys(), key=SessionKey.sort_key)
    names = [cache.keys.session(key) for key in keys]
    problems = []
    for key, name, redis_read in zip(keys, names, cache.read_many(names), strict=True):
        found = _session_problems(key, expected.get(key), redis_read, rows.get(key), fake)
        problems += [f"{name}: {problem}" for problem in found]
    return problems


def _session_problems(
    key: SessionKey,
    tracked: Tracked | None,
    redis_read: SessionRead,
    row: StoredSession | None,
    fake: Mapping[str, FakeRun],
) -> list[str]:
    if tracked is None:
        return ["a row in Postgres that the demo never wrote"]
    if row is None:
        return ["missing in Postgres"]
    if isinstance(redis_read, CorruptValue):
        return [f"corrupt in Redis: {redis_read}"]
    problems = _state_problems(tracked, row) + _cleanup_problems(key, tracked, row, fake)
    if redis_read is None:
        return [*problems, "missing in Redis (expired before verification?)"]
    return problems + _mirror_problems(redis_read, row)


def _state_problems(tracked: Tracked, row: StoredSession) -> list[str]:
    """Postgres against what the demo last wrote."""
    checks = [
        (row.status is SessionStatus.CLEANED, f"status {row.status} in Postgres, not cleaned"),
        (
            row.version == tracked.expected_version,
            f"version {row.version} in Postgres, {tracked.expected_version} expected",
        ),
        (row.snapshot == tracked.snapshot, "snapshot in Postgres differs from the last save"),
        (row.layer_specs == tracked.specs, "layer specs in Postgres differ from the last save"),
        (
            row.closed_by is tracked.expected_closed_by,
            f"closed_by {row.closed_by} in Postgres, {tracked.expected_closed_by} expected",
        ),
    ]
    return [problem for ok, problem in checks if not ok]


def _mirror_problems(redis_rec: StoredSession, row: StoredSession) -> list[str]:
    """Postgres against Redis: the final version must have been flushed, field for field."""
    checks = [
        (not redis_rec.dirty, f"still dirty in Redis (version {redis_rec.version})"),
        (
            redis_rec.version == row.version,
            f"version {redis_rec.version} in Redis, {row.version} in Postgres",
        ),
        (
            redis_rec.status is row.status,
            f"status {redis_rec.status} in Redis, {row.status} in Postgres",
        ),
        (redis_rec.data == row.data, "Redis and Postgres hold different session data"),
        (redis_rec.closed_by is row.closed_by, "Redis and Postgres disagree on closed_by"),
        (
            redis_rec.cleanup_error == row.cleanup_error,
            "Redis and Postgres disagree on cleanup_error",
        ),
    ]
    return [problem for ok, problem in checks if not ok]


def _cleanup_problems(
    key: SessionKey, tracked: Tracked, row: StoredSession, fake: Mapping[str, FakeRun]
) -> list[str]:
    run_id = row.data.backend_run_id
    if tracked.retired_by:
        ok = run_id == tracked.retired_by
        return [] if ok else [f"backend_run_id {run_id}, not the failed run {tracked.retired_by}"]
    if row.cleanup_error:
        return [f"cleanup did not finish: {row.cleanup_error}"]
    if run_id is None:
        return ["no cleanup backend_run_id"]
    return _fake_cleanup_problems(key, row, run_id, fake)


def _fake_cleanup_problems(
    key: SessionKey, row: StoredSession, run_id: str, fake: Mapping[str, FakeRun]
) -> list[str]:
    run = fake.get(run_id)
    if run is None:
        return [f"the backend never saw cleanup run {run_id}"]
    checks = [
        (run.is_cleanup, f"backend run {run_id} is not a cleanup run"),
        (run.status == "succeeded", f"cleanup run {run_id} ended {run.status}"),
        (
            run.request.idempotency_key
            == cleanup_idempotency_key(key, retirement=retirement_of(row)),
            f"cleanup run {run_id} has idempotency key {run.request.idempotency_key!r}",
        ),
    ]
    return [problem for ok, problem in checks if not ok]


def build_facts(
    setup: Mapping[str, object],
    results: Sequence[WorkflowResult],
    counters: Mapping[str, int],
    rows: TenantRows,
) -> dict[str, object]:
    """The report's numbers: what the workload did, what Postgres and the backend saw, and
    (``rows_flushed``) what the key prefix's counters say."""
    tracked = [t for result in results for t in result.saved_sessions().values()]
    redis_writes = sum(t.expected_version for t in tracked)
    flushed = counters.get("rows_flushed", 0)
    workflows = [r for r in results if r.kind is OwnerType.WORKFLOW_RUN]
    chats = [r for r in results if r.kind is OwnerType.CONVERSATION]
    return {
        **setup,
        "runs": len(workflows),
        "conversations_ended": len(chats),
        "config_switches": sum(r.config_switches for r in chats),
        "sessions_by_owner": {
            kind.value: sum(len(r.saved_sessions()) for r in results if r.kind is kind)
            for kind in OwnerType
        },
        "agent_runs": sum(len(result.latencies_ms) for result in results),
        "agent_outcomes": dict(sum((result.statuses for result in results), Counter[str]())),
        "workflow_outcomes": dict(Counter(result.outcome for result in workflows)),
        "resumes": sum(result.resumes for result in results),
        "sessions": len(tracked),
        "latency_ms": p50_p99([ms for result in results for ms in result.latencies_ms], 3),
        "cpu_ms": p50_p99([ms for result in results for ms in result.cpu_ms], 3),
        "saves": sum(result.saves for result in results),
        "retires": sum(result.retires for result in results),
        "redis_writes": redis_writes,
        "rows_flushed": flushed,
        "coalescing": round(redis_writes / flushed, 2) if flushed else None,
        "flush_lag_s": p50_p99(rows.flush_lags_s, 3),
        "cleanups_done": rows.cleanups_done,
        "cleanups_gave_up": rows.cleanups_gave_up,
    }
