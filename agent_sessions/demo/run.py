"""``agent-sessions demo``: a loop-heavy workload through the real stack, then proof it held.

1. Start the loopback fake agent backend in a process of its own, migrate ``DATABASE_URL``
   and start an ``agent-sessions worker`` pool as real subprocesses (own process group,
   always stopped): :mod:`agent_sessions.demo.stack`.
2. Drive workflow runs and chat conversations concurrently, on one thread pool: each
   workflow run loops ``iterations`` times over ``nodes`` Agent nodes, each conversation
   takes ``turns`` turns with one agent (every ``config_switch_every``-th one switches the
   agent's config snapshot half-way: its old session is retired and cleaned up), all through
   :class:`SessionLifecycle` and the HTTP backend client; some agent runs fail, are cancelled
   or pause (the next entry is the resume). Every run and every conversation then ends.
3. Wait for the write-behind to drain and every cleanup to finish, verify Postgres against
   what the demo last wrote and against Redis, and print the report
   (:mod:`agent_sessions.demo.report`).

Isolation: its own key prefix (the deployment's plus ``-demo``: ``asc-demo`` by default) and a
tenant id unique to this demo run; it reads back only that tenant's rows.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace

import click

from agent_backend.client import AgentBackendClient
from agent_backend.models import CreateRunRequest, RunStatusResponse
from agent_sessions.audit import HEALTHY, audit
from agent_sessions.demo.plans import (
    DemoConfig,
    chat_scope,
    composition,
    demo_scope,
    plan_behaviours,
    plan_turns,
)
from agent_sessions.demo.progress import progress
from agent_sessions.demo.render import render_text
from agent_sessions.demo.report import (
    Report,
    Tracked,
    WorkflowResult,
    build_facts,
    counter_delta,
    counter_problems,
    tenant_rows,
    verify,
)
from agent_sessions.demo.stack import (
    Stack,
    demo_prefix,
    demo_stack,
    drain_problem,
    wait_for_write_behind,
)
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.outcomes import Entry, NodeResult, RunOutcome
from agent_sessions.requests import extract_layer_specs
from agent_sessions.testing.fake_backend import BEHAVIOUR_METADATA_KEY
from cache.records import ConversationScope, OwnerType, Scope, SessionKey
from cache.settings import Settings

RUN_WAIT_S = 30.0
RUN_POLL_S = 0.005


class Interrupted(Exception):
    """The demo is stopping (Ctrl-C or an error in another workflow run)."""


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
    """Enter, run on the backend, finish; time only our two calls (wall time and this
    thread's CPU time). Returns the run status."""
    lifecycle = work.lifecycle
    name = lifecycle.ctx.cache.keys.session(_key(scope))
    tracked = result.sessions.setdefault(_key(scope), Tracked())
    if isinstance(scope, ConversationScope):
        tracked.owner_end = OwnerType.CONVERSATION.end_closer
    clock = Clock()
    with clock:
        entry = lifecycle.enter(scope)
    check_entry(result, name, entry, tracked)
    request = lifecycle.build_request(
        scope, entry, composition(scope), metadata={BEHAVIOUR_METADATA_KEY: behaviour}
    )
    outcome = RunOutcome.from_status(request, run_on_backend(client, request))
    with clock:
        node_result = lifecycle.finish(scope, entry, outcome)
    result.latencies_ms.append(clock.wall_s * 1000)
    result.cpu_ms.append(clock.cpu_s * 1000)
    record(result, name, outcome, node_result, tracked)
    return outcome.status


class Clock:
    """Adds up the wall time and this thread's CPU time of the blocks it times."""

    def __init__(self) -> None:
        self.wall_s = self.cpu_s = 0.0
        self._wall = self._cpu = 0.0

    def __enter__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def __exit__(self, *exc: object) -> None:
        self.wall_s += time.perf_counter() - self._wall
        self.cpu_s += time.thread_time() - self._cpu


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


def _follow(futures: Sequence[Future[WorkflowResult]], count: Progress, total: int) -> None:
    """Show the progress until every task is done; the first task error is raised at once."""
    with progress("agent runs", total, "agent runs", "done") as update:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.1)
            for future in done:
                future.result()
            update(count.done)


# ------------------------------------------------------------------------------ the demo


def run_demo(config: DemoConfig) -> Report:
    """Run the whole demo and return its report (``report.verified`` says how it went)."""
    started = time.monotonic()
    seed = config.seed if config.seed is not None else secrets.randbelow(1_000_000)
    tenant_id = f"demo-{secrets.token_hex(4)}"
    settings = Settings()
    config = replace(config, prefix=demo_prefix(config.prefix, settings))
    settings = settings.model_copy(update={"key_prefix": config.prefix})
    with demo_stack(settings, config.workers) as stack:
        report = _run_on(stack, config, tenant_id, seed)
        stack.pool.keep_log = not report.verified
        if not report.verified:
            report.facts["worker_log"] = str(stack.pool.log)
    report.facts["wall_s"] = round(time.monotonic() - started, 2)
    return report


def _run_on(stack: Stack, config: DemoConfig, tenant_id: str, seed: int) -> Report:
    before = stack.ctx.cache.counters()
    work = Workload(config, tenant_id, SessionLifecycle(stack.ctx), stack.backend.url)
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
    problems += verify(cache, repo, stack.backend.runs(), str(setup["tenant"]), results)
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
