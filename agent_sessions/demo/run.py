"""``agent-sessions demo``: a loop-heavy workload through the real stack, then proof it held.

1. Migrate ``DATABASE_URL``, start the loopback fake agent backend in this process and an
   ``agent-sessions worker`` pool as real subprocesses (own process group, always stopped).
2. Drive workflow runs and chat conversations concurrently, on one thread pool: each
   workflow run loops ``iterations`` times over ``nodes`` Agent nodes, each conversation
   takes ``turns`` turns with one agent (every ``config_switch_every``-th one switches the
   agent's config snapshot half-way: its old session is retired and cleaned up), all through
   :class:`SessionLifecycle` and the HTTP backend client; some agent runs fail, are cancelled
   or pause (the next entry is the resume). Every run and every conversation then ends.
3. Wait for the write-behind to drain and every cleanup to finish, verify Postgres against
   what the demo last wrote and against Redis, and print the report
   (:mod:`agent_sessions.demo.report`).

Isolation: its own key prefix (``asc-demo``) and a tenant id unique to this demo run; it reads
back only that tenant's rows.
"""

from __future__ import annotations

import contextlib
import random
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field

import click

from agent_backend.client import AgentBackendClient
from agent_backend.models import (
    CreateRunRequest,
    RunComposition,
    RunLayerSpec,
    RunStatusResponse,
)
from agent_sessions.audit import HEALTHY, audit
from agent_sessions.demo.report import (
    Report,
    Tracked,
    WorkflowResult,
    build_facts,
    counter_delta,
    counter_problems,
    render_text,
    tenant_rows,
    verify,
)
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.outcomes import Entry, NodeResult, RunOutcome
from agent_sessions.requests import extract_layer_specs
from agent_sessions.testing.fake_backend import BEHAVIOUR_METADATA_KEY, FakeAgentBackend
from agent_sessions.testing.worker_process import WorkerProcess
from cache.records import (
    ConversationScope,
    OwnerType,
    Scope,
    SessionKey,
    SessionStatus,
    StoredSession,
)
from cache.settings import Settings
from persistence.migrate import upgrade
from workers.context import WorkerContext
from workers.drain import dirty_total

PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
RUN_WAIT_S = 30.0
RUN_POLL_S = 0.005
DRAIN_POLL_S = 0.2
# Service settings a worker must share with this process; any ASC_-named copy would win.


class Interrupted(Exception):
    """The demo is stopping (Ctrl-C or an error in another workflow run)."""


@dataclass(frozen=True)
class DemoConfig:
    """The flags of ``agent-sessions demo``; ranges are checked by click, the rest here."""

    runs: int = 24
    nodes: int = 3
    iterations: int = 15
    conversations: int = 12
    turns: int = 12
    config_switch_every: int = 3
    threads: int = 4
    fail_rate: float = 0.05
    cancel_rate: float = 0.03
    pause_rate: float = 0.05
    workers: int = 2
    prefix: str = "asc-demo"
    seed: int | None = None
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if not PREFIX_PATTERN.match(self.prefix):
            raise ValueError(f"--prefix must match {PREFIX_PATTERN.pattern}, got {self.prefix!r}")
        if self.fail_rate + self.cancel_rate + self.pause_rate > 1:
            raise ValueError("--fail-rate + --cancel-rate + --pause-rate must not exceed 1")


# ------------------------------------------------------------------------------ workload


def plan_behaviours(config: DemoConfig, rng: random.Random) -> list[list[str]]:
    """Per workflow run, the fake behaviour of each agent run, loop iteration by iteration."""
    steps = [(it, node) for it in range(config.iterations) for node in range(config.nodes)]
    last = config.iterations - 1
    return [[_behaviour(config, rng, it < last) for it, _ in steps] for _ in range(config.runs)]


def plan_turns(config: DemoConfig, rng: random.Random) -> list[list[str]]:
    """Per conversation, the fake behaviour of each turn."""
    last = config.turns - 1
    return [
        [_behaviour(config, rng, turn < last) for turn in range(config.turns)]
        for _ in range(config.conversations)
    ]


def _behaviour(config: DemoConfig, rng: random.Random, may_pause: bool) -> str:
    """A pause is never planned on the last entry: every pause gets its resume."""
    x = rng.random()
    if x < config.fail_rate:
        return "fail"
    if x < config.fail_rate + config.cancel_rate:
        return "cancel"
    paused = x < config.fail_rate + config.cancel_rate + config.pause_rate
    return "pause" if paused and may_pause else "succeed"


def composition(scope: Scope | ConversationScope) -> RunComposition:
    """An agent's layers; ``history`` is added by the lifecycle, plugins never stored."""
    if isinstance(scope, ConversationScope):
        context = {"conversation": scope.conversation_id}
    else:
        context = {"node": scope.node_id}
    return RunComposition(
        layers=[
            RunLayerSpec(name="execution_context", type="dify.execution_context", config=context),
            RunLayerSpec(name="llm", type="dify.plugin.llm", config={"model": "fake-model"}),
            RunLayerSpec(name="tools", type="dify.plugin.tools", config={"tools": ["search"]}),
        ]
    )


def demo_scope(tenant_id: str, run_id: str, node: int, iteration: int) -> Scope:
    return Scope(
        tenant_id=tenant_id,
        app_id="demo-app",
        workflow_id="demo-loop-workflow",
        workflow_run_id=run_id,
        node_id=f"agent-node-{node}",
        node_execution_id=f"agent-node-{node}-iter-{iteration:03d}",
        binding_id=f"binding-{node}",
        agent_id=f"agent-{node}",
        agent_config_snapshot_id=f"agent-{node}-config-1",
    )


def chat_scope(tenant_id: str, conversation_id: str, config: int, turn: int) -> ConversationScope:
    return ConversationScope(
        tenant_id=tenant_id,
        app_id="demo-chat-app",
        conversation_id=conversation_id,
        binding_id="chat-binding",
        agent_id="chat-agent",
        agent_config_snapshot_id=f"chat-agent-config-{config}",
        message_id=f"message-{turn:03d}",
    )


class Progress:
    """A thread-safe count of finished agent runs; the main thread draws it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.done = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.done += n


@dataclass(frozen=True)
class Workload:
    """What every workflow-run task shares."""

    config: DemoConfig
    tenant_id: str
    lifecycle: SessionLifecycle
    backend_url: str
    stop: threading.Event = field(default_factory=threading.Event)
    progress: Progress = field(default_factory=Progress)


def run_workflow(work: Workload, index: int, plan: Sequence[str]) -> WorkflowResult:
    """One workflow run: its loop over the Agent nodes, then ``workflow_ended``."""
    result = WorkflowResult(run_id=f"run-{index:04d}")
    last: dict[int, str] = {}
    with AgentBackendClient(work.backend_url) as client:
        for step, behaviour in enumerate(plan):
            if work.stop.is_set():
                raise Interrupted
            iteration, node = divmod(step, work.config.nodes)
            scope = demo_scope(work.tenant_id, result.run_id, node, iteration)
            last[node] = agent_step(work, client, result, scope, behaviour)
            work.progress.add()
    result.outcome = "failed" if {"failed", "cancelled"} & set(last.values()) else "succeeded"
    work.lifecycle.workflow_ended(work.tenant_id, result.run_id, result.outcome)
    return result


def run_conversation(work: Workload, index: int, plan: Sequence[str]) -> WorkflowResult:
    """One conversation: its turns (switching the agent's config half-way, for some), then
    ``conversation_ended``."""
    result = WorkflowResult(
        run_id=f"chat-{index:04d}", outcome="ended", kind=OwnerType.CONVERSATION
    )
    every = work.config.config_switch_every
    switch_at = len(plan) // 2 if every and index % every == 0 else None
    with AgentBackendClient(work.backend_url) as client:
        for turn, behaviour in enumerate(plan):
            if work.stop.is_set():
                raise Interrupted
            config = 2 if switch_at is not None and turn >= switch_at else 1
            if turn == switch_at:
                _switch_config(work, result)
            scope = chat_scope(work.tenant_id, result.run_id, config, turn)
            agent_step(work, client, result, scope, behaviour)
            work.progress.add()
    work.lifecycle.conversation_ended(work.tenant_id, result.run_id)
    return result


def _switch_config(work: Workload, result: WorkflowResult) -> None:
    """The next turn runs with config 2: the session of config 1, if still active, is retired
    by that turn's ``enter`` (cleaned up on the backend)."""
    result.config_switches += 1
    old = chat_scope(work.tenant_id, result.run_id, 1, 0).key
    tracked = result.sessions.get(old)
    if tracked is not None and tracked.version and tracked.retired_by is None:
        tracked.config_retired = True


def agent_step(
    work: Workload,
    client: AgentBackendClient,
    result: WorkflowResult,
    scope: Scope | ConversationScope,
    behaviour: str,
) -> str:
    """Enter, run on the backend, finish; time only our two calls. Returns the run status."""
    lifecycle = work.lifecycle
    name = lifecycle.ctx.cache.keys.session(_key(scope))
    tracked = result.sessions.setdefault(_key(scope), Tracked())
    if isinstance(scope, ConversationScope):
        tracked.owner_end = OwnerType.CONVERSATION.end_closer
    started = time.perf_counter()
    entry = lifecycle.enter(scope)
    entered = time.perf_counter()
    check_entry(result, name, entry, tracked)
    request = lifecycle.build_request(
        scope, entry, composition(scope), metadata={BEHAVIOUR_METADATA_KEY: behaviour}
    )
    outcome = RunOutcome.from_status(request, run_on_backend(client, request))
    finishing = time.perf_counter()
    node_result = lifecycle.finish(scope, entry, outcome)
    result.latencies_ms.append((entered - started + time.perf_counter() - finishing) * 1000)
    record(result, name, outcome, node_result, tracked)
    return outcome.status


def _key(scope: Scope | ConversationScope) -> SessionKey:
    key = scope.key
    if key is None:
        raise ValueError("a demo scope always has a workflow run")
    return key


def run_on_backend(client: AgentBackendClient, request: CreateRunRequest) -> RunStatusResponse:
    created = client.create_run(request)
    return client.wait_run(created.run_id, timeout_s=RUN_WAIT_S, poll_interval_s=RUN_POLL_S)


def check_entry(result: WorkflowResult, key: str, entry: Entry, tracked: Tracked) -> None:
    """The hot path must hand back exactly the last save, and nothing after a retire."""
    expect_resume = tracked.version > 0 and tracked.retired_by is None
    if entry.resumable != expect_resume:
        result.problems.append(
            f"{key}: entry resumable={entry.resumable}, {expect_resume} expected"
        )
    elif expect_resume and (entry.version, entry.snapshot) != (tracked.version, tracked.snapshot):
        result.problems.append(f"{key}: entry did not return the last saved version and snapshot")
    if tracked.paused and entry.resumable:
        result.resumes += 1
    tracked.paused = False


def record(
    result: WorkflowResult, key: str, outcome: RunOutcome, node: NodeResult, tracked: Tracked
) -> None:
    """Remember what ``finish`` wrote (the expected final state) and count it."""
    result.statuses[outcome.status] += 1
    if node.metadata.get("session_snapshot_persisted") is False or node.conflict:
        result.problems.append(f"{key}: save failed: {node.metadata}")
    if node.version is None:
        return
    tracked.version = node.version
    if outcome.status in ("failed", "cancelled"):
        tracked.retired_by = outcome.backend_run_id
        result.retires += 1
        return
    tracked.snapshot = outcome.snapshot
    tracked.specs = extract_layer_specs(outcome.request.composition)
    tracked.retired_by, tracked.paused = None, outcome.status == "paused"
    result.saves += 1


def run_workload(
    work: Workload, plans: Sequence[Sequence[str]], chats: Sequence[Sequence[str]] = ()
) -> list[WorkflowResult]:
    """Every workflow run and conversation on a small thread pool, one per task, mixed,
    with a progress bar."""
    tasks = [(run_workflow, i, plan) for i, plan in enumerate(plans)]
    for i, plan in enumerate(chats):  # interleaved with the runs, not after them
        tasks.insert(min(2 * i + 1, len(tasks)), (run_conversation, i, plan))
    with ThreadPoolExecutor(work.config.threads, thread_name_prefix="demo-run") as pool:
        futures = [pool.submit(task, work, i, plan) for task, i, plan in tasks]
        total = sum(len(plan) for plan in plans) + sum(len(plan) for plan in chats)
        try:
            _follow(futures, work.progress, total)
        except BaseException:
            work.stop.set()
            pool.shutdown(cancel_futures=True)
            raise
    return [future.result() for future in futures]


def _follow(futures: Sequence[Future[WorkflowResult]], progress: Progress, total: int) -> None:
    """Draw the bar until every task is done; the first task error is raised at once."""
    with click.progressbar(length=total, label="agent runs  ", file=sys.stderr) as bar:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.1)
            for future in done:
                future.result()
            bar.update(progress.done - bar.pos)


# ------------------------------------------------------------------------------ the stack


@contextlib.contextmanager
def worker_pool(settings: Settings, backend_url: str, workers: int) -> Iterator[WorkerProcess]:
    """The demo's worker pool, configured to clean up on the fake backend."""
    configured = settings.model_copy(update={"agent_backend_url": backend_url})
    with WorkerProcess(configured, workers) as pool:
        yield pool


@dataclass(frozen=True)
class Stack:
    """The running pieces the demo talks to."""

    ctx: WorkerContext
    fake: FakeAgentBackend
    pool: WorkerProcess


@contextlib.contextmanager
def demo_stack(config: DemoConfig) -> Iterator[Stack]:
    settings = Settings().model_copy(update={"key_prefix": config.prefix})
    _say(f"migrating {_safe_url(settings.database_url)}")
    upgrade(settings.database_url, key_prefix=settings.key_prefix)
    ctx = WorkerContext.from_settings(settings)
    try:
        with FakeAgentBackend() as fake, worker_pool(settings, fake.url, config.workers) as pool:
            _say(f"fake agent backend at {fake.url}; worker pool pid {pool.proc.pid}")
            yield Stack(ctx, fake, pool)
    finally:
        ctx.close()


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _say(text: str) -> None:
    click.echo(text, err=True)


# ------------------------------------------------------------------------------ draining


def count_settled(stack: Stack, names: Sequence[str]) -> int:
    """Sessions that are ``cleaned`` in Redis with their final version flushed."""
    reads = stack.ctx.cache.read_many(names)
    return sum(
        isinstance(r, StoredSession) and r.status is SessionStatus.CLEANED and not r.dirty
        for r in reads
    )


def wait_for_write_behind(stack: Stack, names: Sequence[str], timeout_s: float) -> bool:
    """Poll until nothing under the prefix is dirty and every session of ours is settled."""
    deadline = time.monotonic() + timeout_s
    with click.progressbar(length=len(names), label="write-behind", file=sys.stderr) as bar:
        while True:
            settled = count_settled(stack, names)
            bar.update(settled - bar.pos)
            if settled == len(names) and not dirty_total(stack.ctx):
                return True
            if time.monotonic() > deadline or not stack.pool.alive():
                return False
            time.sleep(DRAIN_POLL_S)


def drain_problem(stack: Stack, timeout_s: float) -> str:
    if not stack.pool.alive():
        return f"the worker pool exited with status {stack.pool.proc.returncode}"
    return f"the write-behind did not drain within --timeout {timeout_s:g} s"


# ------------------------------------------------------------------------------ the demo


def run_demo(config: DemoConfig) -> Report:
    """Run the whole demo and return its report (``report.verified`` says how it went)."""
    started = time.monotonic()
    seed = config.seed if config.seed is not None else secrets.randbelow(1_000_000)
    tenant_id = f"demo-{secrets.token_hex(4)}"
    with demo_stack(config) as stack:
        report = _run_on(stack, config, tenant_id, seed)
        stack.pool.keep_log = not report.verified
        if not report.verified:
            report.facts["worker_log"] = str(stack.pool.log)
    report.facts["wall_s"] = round(time.monotonic() - started, 2)
    return report


def _run_on(stack: Stack, config: DemoConfig, tenant_id: str, seed: int) -> Report:
    before = stack.ctx.cache.counters()
    work = Workload(config, tenant_id, SessionLifecycle(stack.ctx), stack.fake.url)
    phase = time.monotonic()
    rng = random.Random(seed)
    results = run_workload(work, plan_behaviours(config, rng), plan_turns(config, rng))
    workload_s, phase = time.monotonic() - phase, time.monotonic()
    names = [stack.ctx.cache.keys.session(key) for r in results for key in r.saved_sessions()]
    drained = wait_for_write_behind(stack, names, config.timeout)
    setup = {**asdict(config), "seed": seed, "tenant": tenant_id}
    setup |= {"workload_s": round(workload_s, 2), "drain_s": round(time.monotonic() - phase, 2)}
    problems = [] if drained else [drain_problem(stack, config.timeout)]
    return _check(stack, setup, results, before, problems)


def _check(
    stack: Stack,
    setup: dict[str, object],
    results: list[WorkflowResult],
    before: dict[str, int],
    problems: list[str],
) -> Report:
    """Verify the demo's runs, then measure what the stack counted."""
    cache, repo = stack.ctx.cache, stack.ctx.repo
    problems += verify(cache, repo, stack.fake, str(setup["tenant"]), results)
    counters = counter_delta(before, cache.counters())
    sessions = sum(len(result.saved_sessions()) for result in results)
    problems += counter_problems(cache.keys.stats, counters, sessions)
    rows = tenant_rows(repo, str(setup["tenant"]))
    counts = audit(stack.ctx).as_dict()["counts"]
    problems += [f"audit: {n} {what}" for what, n in counts.items() if n and what not in HEALTHY]
    facts = build_facts(setup, results, counters, rows) | {"audit": counts}
    return Report(facts, problems)


def main(config: DemoConfig, *, as_json: bool) -> int:
    """Run, print the report (text, or one JSON line), return the exit status."""
    report = run_demo(config)
    click.echo(report.as_json() if as_json else render_text(report))
    return 0 if report.verified else 1
