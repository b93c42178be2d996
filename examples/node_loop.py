"""A workflow engine's Agent node on agent-session-cache, end to end: run it as it is.

    .venv/bin/python examples/node_loop.py

It reads REDIS_URL, DATABASE_URL and ASC_* from the environment like ``agent-sessions``, and
uses the key prefix ``asc-example`` unless ASC_KEY_PREFIX is set. It migrates the database
when its schema is not at this build's newest revision, starts the loopback fake agent
backend in this process and an ``agent-sessions worker`` pool beside it (the write-behind
and the cleanups run there), then:

1. runs a workflow whose loop enters one Agent node three times: each entry resumes the
   session the one before saved (the fake agent appends one message to its history);
2. pauses the workflow for human input and resumes it: the node's next entry gets the
   paused session and the pending tool call;
3. ends the workflow (``workflow_ended``): its session is cleaned up on the backend;
4. holds a conversation: each turn resumes the last, a turn under another agent config
   starts fresh (the old config's session is cleaned up), ``conversation_ended`` ends it;
5. waits until Postgres holds every session as ``cleaned``, and prints them.

Exit status 0 when all of that happened, 1 when it did not, 2 when the database is missing.
"""

from __future__ import annotations

import os
import secrets
import sys
import time

from agent_sessions import (
    AgentBackendClient,
    ConversationScope,
    Entry,
    NodeResult,
    RunComposition,
    RunLayerSpec,
    RunOutcome,
    Scope,
    SessionLifecycle,
    Settings,
)
from agent_sessions.testing.fake_backend import FakeAgentBackend
from agent_sessions.testing.worker_process import WorkerProcess
from cache.records import Owner, SessionStatus
from persistence.errors import DatabaseMissing
from persistence.migrate import schema_state, upgrade
from workers.preflight import missing_database, using_line

TENANT = "acme"
SETTLE_TIMEOUT_S = 60.0


def agent_node_composition() -> RunComposition:
    """What an Agent node asks the backend to run. The fake backend, like the real one,
    refuses a composition without a ``dify.plugin.llm`` layer; ``build_request`` adds the
    ``pydantic_ai.history`` layer, and credential-bearing layers are never stored."""
    return RunComposition(
        layers=[
            RunLayerSpec(name="prompt", type="plain.prompt", config={"text": "triage tickets"}),
            RunLayerSpec(name="llm", type="dify.plugin.llm", config={"model": "any"}),
        ]
    )


# --8<-- [start:node]
def run_agent_node(
    lifecycle: SessionLifecycle,
    backend: AgentBackendClient,
    scope: Scope | ConversationScope,
    composition: RunComposition,
    *,
    attempt: int = 0,
    metadata: dict[str, object] | None = None,
) -> NodeResult:
    """One entry of an Agent node (or one turn of a conversation): resume, run, store."""
    entry = lifecycle.enter(scope)  # one round trip; fresh if nothing resumable
    request = lifecycle.build_request(scope, entry, composition, attempt, metadata=metadata)
    created = backend.create_run(request)  # snapshot threaded in, suspend on exit
    status = backend.wait_run(created.run_id, timeout_s=600)
    result = lifecycle.finish(scope, entry, RunOutcome.from_status(request, status))
    show(scope, entry, result)  # this example prints what happened
    if result.status == "paused":
        ...  # pause the WORKFLOW (result.pause); the resume re-enters this node
    if result.conflict:
        ...  # another entry of this session saved first; its snapshot was kept
    return result  # store errors are in result.metadata


# --8<-- [end:node]


# --8<-- [start:workflow]
def run_workflow(
    lifecycle: SessionLifecycle, backend: AgentBackendClient, workflow_run_id: str
) -> None:
    """A loop over one Agent node, a pause for human input, and the workflow's end."""
    composition = agent_node_composition()

    def node(execution: str) -> Scope:  # every entry of the node has the same session key
        return Scope(
            tenant_id=TENANT,
            app_id="app-1",
            workflow_id="triage",
            workflow_run_id=workflow_run_id,
            node_id="agent_node",
            node_execution_id=execution,  # this entry: idempotency key "<run>:<execution>"
            binding_id="binding-1",
            agent_id="agent-1",
            agent_config_snapshot_id="soul-v1",
        )

    for iteration in range(1, 4):  # the loop: each iteration resumes the last one's session
        run_agent_node(lifecycle, backend, node(f"loop-{iteration}"), composition)
    asks: dict[str, object] = {"fake_behaviour": "human_input"}  # the FAKE backend asks a human
    run_agent_node(lifecycle, backend, node("ask"), composition, metadata=asks)  # paused
    # ... the workflow waits until the human answers, then resumes and re-enters the node:
    run_agent_node(lifecycle, backend, node("after-answer"), composition)
    # at the workflow's terminal event (succeeded, partial_succeeded, failed, aborted):
    report = lifecycle.workflow_ended(TENANT, workflow_run_id, "succeeded")
    print(f"workflow_ended: {report.sessions} session(s), {report.cleanups_enqueued} cleanup(s)")


# --8<-- [end:workflow]


# --8<-- [start:conversation]
def run_conversation(
    lifecycle: SessionLifecycle, backend: AgentBackendClient, conversation_id: str
) -> None:
    """Turns of an Agent App conversation; the user edits the agent before the last one."""
    composition = agent_node_composition()
    configs = ["soul-v1", "soul-v1", "soul-v1", "soul-v2"]  # the agent's config per turn
    for turn, config in enumerate(configs, start=1):
        scope = ConversationScope(
            tenant_id=TENANT,
            app_id="chat-app",
            conversation_id=conversation_id,
            binding_id="binding-1",
            agent_id="agent-1",
            agent_config_snapshot_id=config,  # another config: a fresh session
            message_id=f"m-{turn}",  # this turn: idempotency key "<conversation>:<message>"
        )
        run_agent_node(lifecycle, backend, scope, composition)
    report = lifecycle.conversation_ended(TENANT, conversation_id)  # the user deleted it
    print(f"conversation_ended: {report.sessions} session(s)")


# --8<-- [end:conversation]


def show(scope: Scope | ConversationScope, entry: Entry, result: NodeResult) -> None:
    """One line per entry: what it resumed and what it stored."""
    if isinstance(scope, ConversationScope):
        where = f"turn {scope.message_id} (config {scope.agent_config_snapshot_id})"
    else:
        where = f"node entry {scope.node_execution_id}"
    came = "fresh"
    if entry.resumable:
        messages = history_length(entry)
        came = f"resumed version {entry.version} ({messages} message{'' if messages == 1 else 's'})"
        if entry.pending_tool_call_id:
            came += f", the answer to tool call {entry.pending_tool_call_id}"
    went: str = result.status
    if result.pause is not None:
        went = f"paused for human input (tool call {result.pause.pending_tool_call_id})"
    print(f"  {where}: {came} -> {went}, saved version {result.version}")


def history_length(entry: Entry) -> int:
    """How many messages the resumed snapshot's ``history`` layer holds."""
    snapshot = entry.snapshot.to_dict() if entry.snapshot is not None else {}
    layers = snapshot.get("layers")
    for layer in layers if isinstance(layers, list | tuple) else ():
        if isinstance(layer, dict) and layer.get("name") == "history":
            state = layer.get("runtime_state")
            messages = state.get("messages") if isinstance(state, dict) else None
            return len(messages) if isinstance(messages, list) else 0
    return 0


def example_settings() -> Settings:
    """The environment's settings, with the example's own key prefix unless one is set."""
    if os.environ.get("ASC_KEY_PREFIX"):
        return Settings()
    return Settings(key_prefix="asc-example")


def ensure_schema(settings: Settings) -> bool:
    """Migrate the database when it is not at this build's head; ``False`` (and the line
    that says how to create it) when the database does not exist."""
    try:
        state = schema_state(settings.database_url)
    except DatabaseMissing:
        print(missing_database(settings.database_url), file=sys.stderr)
        return False
    if not state.at_head:
        print(f"migrating the database to {state.head} (what `agent-sessions migrate` does)")
        upgrade(settings.database_url, key_prefix=settings.key_prefix)
    return True


def cleaned_in_postgres(lifecycle: SessionLifecycle, owners: list[Owner]) -> bool:
    """Wait until every session of ``owners`` is ``cleaned`` in Postgres, then print them."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        rows = [row for owner in owners for row in lifecycle.ctx.repo.list_owner(owner)]
        done = bool(rows) and all(row.status is SessionStatus.CLEANED for row in rows)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for row in rows:
        why = row.closed_by.value if row.closed_by else "-"
        ids = "/".join(row.key.parts())
        print(f"  postgres: {ids}: {row.status.value} ({why}), version {row.version}")
    return done


def main() -> int:
    settings = example_settings()
    print(using_line(settings))  # using redis ..., key prefix ..., database ...
    if not ensure_schema(settings):
        return 2
    suffix = secrets.token_hex(4)
    run_id, conversation_id = f"run-{suffix}", f"chat-{suffix}"
    with FakeAgentBackend() as fake, AgentBackendClient(fake.url) as backend:
        pool = settings.model_copy(update={"agent_backend_url": fake.url})
        with WorkerProcess(pool, 1) as workers:
            lifecycle = SessionLifecycle.from_settings(settings)
            try:
                print(f"workflow run {run_id}:")
                run_workflow(lifecycle, backend, run_id)
                print(f"conversation {conversation_id}:")
                run_conversation(lifecycle, backend, conversation_id)
                print("waiting for the workers to clean up and flush every session:")
                owners = [Owner(TENANT, run_id), Owner.conversation(TENANT, conversation_id)]
                if cleaned_in_postgres(lifecycle, owners):
                    print("done: every session was cleaned up on the backend and in Postgres")
                    return 0
            finally:
                lifecycle.close()
            print(f"not every session was cleaned; the workers' log:\n{workers.tail()}")
            return 1


if __name__ == "__main__":
    sys.exit(main())
