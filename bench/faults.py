"""What the ``fault_recovery`` cases share (split from :mod:`bench.fault_recovery`).

- a case's stack (:func:`case_stack`: servers, settings, pools; optionally the fake backend);
- the save load (:class:`Loader`) and what became of every acknowledged save
  (:func:`landings`: when Postgres first had it, or that it never did);
- finding the pool's processes from the outside: the worker holding a flush lock
  (:func:`flusher_pid`), the live flush trigger (:func:`live_trigger`), the end of the whole
  process group (:func:`signal_group`);
- sessions whose cleanup is a backend run (:func:`seed_backend_sessions`: real Agent-node
  runs through ``SessionLifecycle`` against the fake backend) and what became of their
  cleanup (:func:`cleaned`, :func:`cleanup_runs`).
"""

from __future__ import annotations

import bisect
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_sessions.testing.fake_backend import FakeAgentBackend
from bench.flush_lag import FlushLog, install_flush_log, read_flush_log
from bench.harness import HarnessError, private_redis
from bench.hot_path import build_keys, build_write
from bench.stack import (
    WorkerPool,
    bench_settings,
    migrated_database,
    wait_for,
    worker_context,
    worker_pool,
)
from cache.records import Scope, SessionKey, SessionStatus
from workers.context import WorkerContext
from workers.drain import dirty_total

WORKERS = 2
"""Processes of each pool (``agent-sessions worker -n 2``)."""
SESSIONS = 200
"""Sessions the load saves round-robin."""
RATE_PER_S = 400
"""Saves per second of the load."""
SHARDS = 16


# --------------------------------------------------------------------------------- saves


@dataclass
class Saves:
    """Client time of each save, per session, by the version it returned."""

    times: dict[tuple[str, str], dict[int, float]] = field(default_factory=dict)
    count: int = 0


class Loader(threading.Thread):
    """Saves ~8 KB snapshots round-robin at :data:`RATE_PER_S` until halted, timing each."""

    def __init__(self, ctx: WorkerContext, keys: Sequence[SessionKey]) -> None:
        super().__init__(name="loader", daemon=True)
        self.ctx, self.keys, self.saves = ctx, keys, Saves()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        write, cache = build_write(), self.ctx.cache
        times = [self.saves.times.setdefault((k.owner_id, k.node_id), {}) for k in self.keys]
        start = time.monotonic()
        try:
            while not self.stop.is_set():
                i = self.saves.count % len(self.keys)
                before = time.time()
                times[i][cache.save(self.keys[i], write)] = before
                self.saves.count += 1
                ahead = self.saves.count / RATE_PER_S - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        except BaseException as exc:  # reported by halt(), in the main thread
            self.error = exc

    def halt(self) -> Saves:
        """Stop the load; every save it made (raises if the load itself failed)."""
        self.stop.set()
        self.join()
        if self.error is not None:
            raise HarnessError(f"the load failed: {self.error!r}")
        return self.saves


@dataclass(frozen=True)
class Landings:
    """Every acknowledged save as ``(saved, landed)`` (client time; ``flushed_at`` of the
    first Postgres write of its session at a version at least its own), and the saves no
    write ever covered (``"run/node v3"``)."""

    pairs: list[tuple[float, float]]
    lost: list[str]

    @property
    def checked(self) -> int:
        return len(self.pairs) + len(self.lost)


def landings(saves: Saves, log: FlushLog) -> Landings:
    pairs, lost = [], []
    for key, times in saves.times.items():
        versions, written_at = log.get(key, ([], []))
        for version, saved in times.items():
            first = bisect.bisect_left(versions, version)
            if first == len(versions):
                lost.append(f"{key[0]}/{key[1]} v{version}")
            else:
                pairs.append((saved, written_at[first]))
    return Landings(pairs, lost)


def waits_after(
    pairs: Sequence[tuple[float, float]], killed_at: float, saved_before: float = math.inf
) -> list[float]:
    """For every save made before ``saved_before`` that landed after ``killed_at``: how long
    it waited after the kill, ``landed - max(saved, killed_at)``."""
    return [
        landed - max(saved, killed_at)
        for saved, landed in pairs
        if landed > killed_at and saved < saved_before
    ]


def longest_wait_per_kill(
    pairs: Sequence[tuple[float, float]], kills: Sequence[float]
) -> list[float]:
    """Per kill: the longest wait after it of the saves made before the next kill (all saves
    for the last one); 0 when no save of that window landed after the kill."""
    ends = [*kills[1:], math.inf]
    return [
        max(waits_after(pairs, kill, saved_before=end), default=0.0)
        for kill, end in zip(kills, ends, strict=True)
    ]


# --------------------------------------------------------------------------------- stacks


@dataclass
class Stack:
    """One case's servers, this process's context on them, and where pools are kept."""

    ctx: WorkerContext
    db_url: str
    fake: FakeAgentBackend | None
    resources: ExitStack

    def pool(self, *, ready: bool = True) -> WorkerPool:
        """A new pool, stopped (whole group) when the case ends."""
        return self.resources.enter_context(worker_pool(self.ctx.settings, WORKERS, ready=ready))

    @property
    def backend(self) -> FakeAgentBackend:
        if self.fake is None:
            raise HarnessError("this case runs without an agent backend")
        return self.fake

    @property
    def delay_s(self) -> float:
        return self.ctx.settings.flush_delay_ms / 1000

    def settled(self, loader: Loader) -> tuple[float, Landings]:
        """Stop the load, wait until the pool flushed the rest: (seconds that took, what
        became of every save)."""
        saves = loader.halt()
        ctx = self.ctx
        settle = wait_for(lambda: not dirty_total(ctx), "the pool to flush the rest", poll_s=0.05)
        return settle, landings(saves, read_flush_log(self.db_url))


@contextmanager
def case_stack(*, backend: bool = False, **overrides: Any) -> Iterator[Stack]:
    """A private Redis, a migrated scratch database with the flush log, settings with
    :data:`SHARDS` shards (and ``overrides``), and with ``backend`` an in-process fake agent
    backend they point at."""
    with ExitStack() as resources:
        fake = resources.enter_context(FakeAgentBackend()) if backend else None
        redis_url = resources.enter_context(private_redis())
        db_url = resources.enter_context(migrated_database())
        install_flush_log(db_url)
        if fake is not None:
            overrides["agent_backend_url"] = fake.url
        settings = bench_settings(redis_url, db_url, shards=SHARDS, **overrides)
        ctx = resources.enter_context(worker_context(settings))
        yield Stack(ctx, db_url, fake, resources)


@contextmanager
def loading(st: Stack, pool: WorkerPool) -> Iterator[tuple[WorkerContext, WorkerPool, Loader]]:
    """The save load on a running pool, from when it flushes at its steady pace (after two
    flush delays) to the end of the block, however that ends."""
    loader = Loader(st.ctx, build_keys(SESSIONS))
    loader.start()
    try:
        time.sleep(2 * st.delay_s)
        yield st.ctx, pool, loader
    finally:
        loader.stop.set()


# --------------------------------------------------------------------------------- processes


def group_member(pid: int, pgid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process of the process group ``pgid``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state, _ppid, group = stat.rsplit(")", 1)[1].split()[:3]
    return state not in ("Z", "X") and int(group) == pgid


def flusher_pid(
    ctx: WorkerContext,
    pool: WorkerPool,
    allowed: Callable[[int], bool] = lambda pid: True,
    timeout_s: float = 30.0,
) -> int:
    """A pool worker that holds a shard's flush lock (so: mid-flush) and ``allowed`` accepts;
    the lock's token names the holder (``host:pid:random``)."""
    cache = ctx.cache
    locks = [cache.keys.flush_lock(shard) for shard in cache.keys.all_shards()]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tokens: list[bytes | None] = cache.client.mget(locks)  # type: ignore[assignment]
        for token in tokens:
            pid = int(token.split(b":")[1]) if token else 0
            if pid and group_member(pid, pool.proc.pid) and allowed(pid):
                return pid
        time.sleep(0.002)
    raise HarnessError(f"no flush lock was seen held by a pool worker:\n{pool.tail()}")


def live_trigger(
    ctx: WorkerContext, pool: WorkerPool, other_than: int | None = None, timeout_s: float = 30.0
) -> int:
    """The pid of the pool's live flush trigger (one that recorded a pass in
    ``<prefix>:triggers``), other than ``other_than``."""
    found: list[int] = []

    def passed() -> bool:
        pids = [int(name.rpartition(":")[2]) for name in ctx.cache.trigger_passes()]
        found[:] = [p for p in pids if p != other_than and group_member(p, pool.proc.pid)]
        return bool(found)

    wait_for(passed, "a flush trigger of the pool to pass", timeout_s=timeout_s, poll_s=0.01)
    return found[0]


def signal_group(pool: WorkerPool, sig: signal.Signals, timeout_s: float) -> float | None:
    """Send ``sig`` to the pool's whole process group; seconds until every process of it is
    gone (the leader reaped as it exits), or ``None`` if some were left after ``timeout_s``."""
    started = time.monotonic()
    os.killpg(pool.proc.pid, sig)
    while time.monotonic() - started < timeout_s:
        pool.proc.poll()  # reap the leader: a zombie would still answer signal 0
        try:
            os.killpg(pool.proc.pid, 0)
        except ProcessLookupError:
            return time.monotonic() - started
        time.sleep(0.01)
    return None


def first_held(
    checks: Mapping[str, Callable[[], bool]],
    *,
    since: float,
    timeout_s: float,
    poll_s: float = 0.05,
) -> dict[str, float]:
    """Poll every check until each has held once: per check, the seconds from ``since`` (a
    ``time.time()``) to the first poll it held at. :class:`HarnessError` on timeout."""
    found: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for name, check in checks.items():
            if name not in found and check():
                found[name] = time.time() - since
        if len(found) == len(checks):
            return found
        if time.monotonic() > deadline:
            waiting = ", ".join(name for name in checks if name not in found)
            raise HarnessError(f"timed out after {timeout_s:.0f}s waiting for {waiting}")
        time.sleep(poll_s)


# --------------------------------------------------------------------------------- cleanups


def seed_backend_sessions(
    ctx: WorkerContext, backend_url: str, scopes: Sequence[Scope]
) -> dict[SessionKey, int]:
    """One Agent-node run per scope, as a workflow engine drives it: ``enter``,
    ``build_request`` (replayable layer specs + a model layer), ``POST /runs``, wait for the
    terminal status, ``finish``. So every session has layer specs and its cleanup is a
    backend run. Flushed before returning; ``{key: version its finish saved}``."""
    from agent_backend.client import AgentBackendClient
    from agent_sessions.lifecycle import SessionLifecycle
    from agent_sessions.outcomes import RunOutcome
    from bench.loop_vs_postgres import build_composition
    from workers.drain import drain

    lifecycle, composition = SessionLifecycle(ctx), build_composition()
    saved: dict[SessionKey, int] = {}
    with AgentBackendClient(backend_url) as client:
        for scope in scopes:
            entry = lifecycle.enter(scope)
            request = lifecycle.build_request(scope, entry, composition)
            created = client.create_run(request)
            status = client.wait_run(created.run_id, timeout_s=10, poll_interval_s=0.01)
            done = lifecycle.finish(scope, entry, RunOutcome.from_status(request, status))
            if (
                scope.key is None
                or done.version is None
                or not done.metadata.get("session_snapshot_persisted")
            ):
                raise HarnessError(f"the node run of {scope} was not saved: {done}")
            saved[scope.key] = done.version
    if not drain(ctx, timeout_s=30).drained:
        raise HarnessError("the seeded sessions did not reach Postgres")
    return saved


def cleanup_runs(fake: FakeAgentBackend, key: SessionKey) -> list[str]:
    """Status of every cleanup run the backend saw for ``key`` (any attempt), in order."""
    from workers.cleanup import cleanup_idempotency_key

    base = cleanup_idempotency_key(key)
    return [
        run.status
        for run in fake.runs()
        if run.is_cleanup and (run.request.idempotency_key or "").startswith(base)
    ]


def cleaned(ctx: WorkerContext, keys: Sequence[SessionKey]) -> tuple[bool, bool]:
    """Whether every session is ``cleaned`` in Redis, and whether Postgres has every one as
    ``cleaned`` too."""
    records = [ctx.cache.load(key).record for key in keys]
    in_redis = all(r is not None and r.status is SessionStatus.CLEANED for r in records)
    if not in_redis:
        return False, False
    rows = [ctx.repo.get(key) for key in keys]
    return True, all(r is not None and r.status is SessionStatus.CLEANED for r in rows)


def lost_versions(ctx: WorkerContext, saved: dict[SessionKey, int]) -> list[str]:
    """The saves (``{key: version}``) whose version Postgres does not have (nor a later one)."""
    lost = []
    for key, version in saved.items():
        row = ctx.repo.get(key)
        if row is None or row.version < version:
            lost.append(f"{key.workflow_run_id}/{key.node_id} v{version}")
    return lost
