"""Shared helpers of the integration tests that need workers, Postgres or the fake backend.

The fixtures defined here (``migrated``, ``start_worker``, ``fake``, ``backend`` and the
autouse ``close_contexts``, which closes every context ``make_ctx`` opened) are registered
for the whole folder by ``conftest.py``.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from agent_backend.client import AgentBackendClient
from agent_backend.models import (
    CompositorSessionSnapshot,
    CreateRunRequest,
    RunComposition,
    RunLayerSpec,
)
from agent_backend.models import RunStatusResponse as Status
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.outcomes import Entry, NodeResult, RunOutcome
from agent_sessions.testing.fake_backend import FakeAgentBackend
from agent_sessions.testing.worker_process import WorkerProcess
from agent_sessions.testing.worker_process import settings_env as product_settings_env
from cache.records import Owner, Scope, SessionKey, SessionStatus, Snapshot, StoredSession
from cache.settings import Settings
from persistence.migrate import upgrade
from persistence.models import sessions
from persistence.repository import SessionRepository
from persistence.rows import row_of_session
from persistence.upsert import UpsertResult
from tests.servers import Database
from workers.context import WorkerContext

WAIT_S = 10.0
STOP_GRACE_S = 5.0
POLL_S = 0.01


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def group_gone_within(leader: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether every process of the group ``leader`` leads is gone within ``timeout``
    seconds (the leader is reaped as it exits: a zombie would still count)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leader.poll()
        try:
            os.killpg(leader.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


_open: list[WorkerContext] = []


@pytest.fixture(autouse=True, name="close_contexts")
def close_contexts_fixture() -> Iterator[None]:
    """Close every context ``make_ctx`` opened during the test."""
    yield
    while _open:
        _open.pop().close()


def make_ctx(redis_url: str, database_url: str, **overrides: object) -> WorkerContext:
    """A worker context for the test's servers; closed by ``close_contexts`` after the test."""
    options: dict[str, object] = {
        "redis_url": redis_url,
        "database_url": database_url,
        "flush_delay_ms": 100,
        "shards": 4,
        "flush_lock_ttl_s": 2,
    }
    options.update(overrides)
    ctx = WorkerContext.from_settings(Settings(**options))  # type: ignore[arg-type]
    _open.append(ctx)
    return ctx


def urgent_flush_queued(ctx: WorkerContext, shard: int) -> bool:
    """Whether an urgent flush job of ``shard`` waits in the flush queue."""
    prefix = f"{ctx.settings.key_prefix}-flush-s{shard:03d}-u-"
    return any(job_id.startswith(prefix) for job_id in ctx.flush_queue.job_ids)


def settings_env(ctx: WorkerContext) -> dict[str, str]:
    """The environment that gives a child process the same settings as ``ctx``."""
    return product_settings_env(ctx.settings)


@pytest.fixture(name="migrated")
def migrated_fixture(database_url: Database) -> Database:
    """A fresh database with the schema migrated to the newest revision."""
    upgrade(database_url.url)
    return database_url


@pytest.fixture(name="start_worker")
def start_worker_fixture(tmp_path: Path) -> Iterator[Callable[[WorkerContext], WorkerProcess]]:
    """Start ``agent-sessions worker`` processes; every one is stopped after the test."""
    started: list[WorkerProcess] = []

    def start(ctx: WorkerContext) -> WorkerProcess:
        worker = WorkerProcess(ctx.settings, log=tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(graces_s=(STOP_GRACE_S,))


@pytest.fixture(name="fake")
def fake_fixture() -> Iterator[FakeAgentBackend]:
    """The loopback fake agent backend (10 ms finish delay)."""
    with FakeAgentBackend() as backend:
        yield backend


@pytest.fixture(name="backend")
def backend_fixture(fake: FakeAgentBackend) -> Iterator[AgentBackendClient]:
    """An HTTP client of the fake backend."""
    with AgentBackendClient(fake.url, timeout_s=5.0) as client:
        yield client


# ------------------------------------------------------------------------- node driving

CREDENTIAL_LAYERS = ("llm", "tools", "core_tools")


def node_composition() -> RunComposition:
    """An Agent-node composition: prompts, context, credential-bearing plugins, output."""
    secret = {"api_key": "sk-secret", "token": "tok-secret"}
    return RunComposition(
        layers=[
            RunLayerSpec(
                name="workflow_node_job_prompt",
                type="plain.prompt",
                metadata={"origin": "workflow_node_job"},
                config={"prefix": "summarise the ticket"},
            ),
            RunLayerSpec(
                name="execution_context",
                type="dify.execution_context",
                config={"tenant_id": "tenant-1", "invoke_from": "service-api"},
            ),
            RunLayerSpec(
                name="llm",
                type="dify.plugin.llm",
                deps={"execution_context": "execution_context"},
                config={"model": "gpt-x", "credentials": secret},
            ),
            RunLayerSpec(
                name="tools",
                type="dify.plugin.tools",
                deps={"execution_context": "execution_context"},
                config={"tools": ["search"], "credentials": secret},
            ),
            RunLayerSpec(name="core_tools", type="dify_core_tools", config={"secret": secret}),
            RunLayerSpec(
                name="output",
                type="dify.output",
                config={"json_schema": {"type": "object"}},
            ),
        ]
    )


@dataclass(frozen=True)
class NodeRun:
    """One Agent-node entry driven against the fake backend."""

    entry: Entry
    request: CreateRunRequest
    status: Status
    result: NodeResult


def run_node(
    lifecycle: SessionLifecycle,
    client: AgentBackendClient,
    scope: Scope,
    *,
    composition: RunComposition | None = None,
    attempt: int = 0,
    behaviour: str | None = None,
    pending_form_id: str | None = None,
    entry: Entry | None = None,
) -> NodeRun:
    """enter → build_request → POST /runs → wait → finish, as a workflow engine does."""
    entry = lifecycle.enter(scope) if entry is None else entry
    metadata: dict[str, object] | None = None
    if behaviour is not None:
        metadata = {"fake_behaviour": behaviour}
    request = lifecycle.build_request(
        scope, entry, composition or node_composition(), attempt, metadata=metadata
    )
    created = client.create_run(request)
    status = client.wait_run(created.run_id, timeout_s=WAIT_S, poll_interval_s=POLL_S)
    outcome = RunOutcome.from_status(request, status, pending_form_id=pending_form_id)
    return NodeRun(entry, request, status, lifecycle.finish(scope, entry, outcome))


def history_of(snapshot: Snapshot | CompositorSessionSnapshot | None) -> list[object]:
    """The ``messages`` of the ``history`` layer of a snapshot (domain or wire form)."""
    assert snapshot is not None, "no snapshot"
    for layer in snapshot.decoded().layers:
        if layer.name == "history":
            messages = layer.runtime_state.get("messages", [])
            assert isinstance(messages, list)
            return list(messages)
    raise AssertionError(f"the snapshot has no history layer: {snapshot.layer_names()}")


def upsert(repo: SessionRepository, batch: Sequence[StoredSession]) -> UpsertResult:
    """The flush's fenced upsert of whole records (the flush builds its rows from hashes)."""
    now = datetime.now(UTC)
    return repo.upsert_rows([row_of_session(session, now) for session in batch])


def rows_of(
    repo: SessionRepository, tenant_id: str, run: str, status: SessionStatus | None = None
) -> list[StoredSession]:
    """A workflow run's rows in Postgres, optionally of one status, in key order."""
    return repo.list_owner(Owner(tenant_id, run), status)


def row_count(repo: SessionRepository) -> int:
    """How many session rows Postgres holds."""
    with repo.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(sessions)).scalar_one())


def redis_status(ctx: WorkerContext, key: SessionKey) -> SessionStatus | None:
    record = ctx.cache.load(key).record
    return None if record is None else record.status


def pg_status(ctx: WorkerContext, key: SessionKey) -> SessionStatus | None:
    row = ctx.repo.get(key)
    return None if row is None else row.status


def stored(ctx: WorkerContext, key: SessionKey) -> StoredSession:
    """The Redis record of ``key`` (fails the test if there is none)."""
    record = ctx.cache.load(key).record
    assert record is not None, f"no session {key} in Redis"
    return record


def row(ctx: WorkerContext, key: SessionKey) -> StoredSession:
    """The Postgres row of ``key`` (fails the test if there is none)."""
    found = ctx.repo.get(key)
    assert found is not None, f"no row {key} in Postgres"
    return found
