"""Operator commands: ``inspect``, ``stats``, ``health``, ``audit``, ``cleanup``,
``services``.

Each prints a readable outline, or one JSON object with ``--json``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from agent_sessions.cli_common import context, emit, full_payloads_as_json, json_option
from cache.records import Owner, SessionKey, SessionStatus

SERVICES_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "services.sh"


@click.group()
def inspect() -> None:
    """Show a workflow run, a conversation, or one session of either: Redis state (dirty,
    TTL, poison) beside Postgres."""


@inspect.command("session")
@click.argument("tenant_id")
@click.argument("workflow_run_id")
@click.argument("node_id")
@click.argument("binding_id")
@click.argument("agent_id")
@click.option("--full", is_flag=True, help="Include the whole snapshot and layer specs.")
@json_option
def inspect_session(
    *,
    tenant_id: str,
    workflow_run_id: str,
    node_id: str,
    binding_id: str,
    agent_id: str,
    full: bool,
    as_json: bool,
) -> None:
    """One session, by its five key IDs; the snapshot decoded (layer names, states, sizes)."""
    _show_session(
        SessionKey(tenant_id, workflow_run_id, node_id, binding_id, agent_id), full, as_json
    )


@inspect.command("conversation-session")
@click.argument("tenant_id")
@click.argument("conversation_id")
@click.argument("binding_id")
@click.argument("agent_id")
@click.argument("agent_config_snapshot_id")
@click.option("--full", is_flag=True, help="Include the whole snapshot and layer specs.")
@json_option
def inspect_conversation_session(
    *,
    tenant_id: str,
    conversation_id: str,
    binding_id: str,
    agent_id: str,
    agent_config_snapshot_id: str,
    full: bool,
    as_json: bool,
) -> None:
    """One session of a conversation, by its five key IDs (the config snapshot id last)."""
    key = SessionKey.conversation(
        tenant_id, conversation_id, binding_id, agent_id, agent_config_snapshot_id
    )
    _show_session(key, full, as_json)


def _show_session(key: SessionKey, full: bool, as_json: bool) -> None:
    from agent_sessions.inspection import inspect_session as gather

    ctx = context(read_only=True, as_json=as_json)
    try:
        result = gather(ctx, key, full=full)
    finally:
        ctx.close()
    if result["redis"] is None and result["postgres"] is None:
        raise click.ClickException(f"no session {result['key']} in Redis or Postgres")
    emit(full_payloads_as_json(result), as_json, ctx.settings)


@inspect.command("conversation")
@click.argument("tenant_id")
@click.argument("conversation_id")
@json_option
def inspect_conversation(tenant_id: str, conversation_id: str, as_json: bool) -> None:
    """A conversation: its state (the config each agent last saved with, its end), and each
    session's status and version in Redis and Postgres."""
    _show_owner(Owner.conversation(tenant_id, conversation_id), "conversation", as_json)


@inspect.command("run")
@click.argument("tenant_id")
@click.argument("workflow_run_id")
@json_option
def inspect_run(tenant_id: str, workflow_run_id: str, as_json: bool) -> None:
    """A workflow run: its state, and each session's status and version in Redis and Postgres."""
    _show_owner(Owner(tenant_id, workflow_run_id), "run", as_json)


def _show_owner(owner: Owner, what: str, as_json: bool) -> None:
    from agent_sessions.inspection import inspect_run as gather

    ctx = context(read_only=True, as_json=as_json)
    try:
        result = gather(ctx, owner)
    finally:
        ctx.close()
    if not result["run"] and not result["sessions"] and not result["ended_in_postgres"]:
        raise click.ClickException(
            f"no {what} {owner.tenant_id}/{owner.owner_id} in Redis or Postgres"
        )
    emit(result, as_json, ctx.settings)


@click.command()
@json_option
def stats(as_json: bool) -> None:
    """Dirty backlog per shard and in total, oldest dirty age, poison entries with reasons,
    sessions waiting for cleanup or given up, queue depths, the worker pools (each flush
    trigger's last pass, each RQ worker's state) and the counters (flushes, cleanups,
    restarts of the pools' processes)."""
    from agent_sessions.inspection import stats as gather

    ctx = context(read_only=True, as_json=as_json)
    try:
        emit(gather(ctx), as_json, ctx.settings)
    finally:
        ctx.close()


@click.command()
@click.option(
    "--local",
    is_flag=True,
    help="Judge only this host's pool (its flush trigger), not the backlog: a liveness probe.",
)
@json_option
def health(local: bool, as_json: bool) -> None:
    """Exit 0 when the write-behind is alive, 1 (with the reasons) when it is not.

    Alive: a flush trigger passed within 3 x ASC_FLUSH_DELAY_MS (at least 1 s), and the
    oldest dirty session is within the delivery bound (3 x ASC_FLUSH_DELAY_MS +
    ASC_FLUSH_LOCK_TTL_S). With --local, only a trigger of this host counts and the backlog
    is not judged (a Postgres outage grows it with every process healthy): use it as a
    Kubernetes liveness probe, and the plain form for readiness and alerts.
    """
    from agent_sessions.health import health as gather

    ctx = context(read_only=True, as_json=as_json, schema="none" if local else "if_it_answers")
    try:
        result = gather(ctx, local=local)
    finally:
        ctx.close()
    if as_json:
        emit(result, as_json, ctx.settings)
    else:
        click.echo("healthy" if result["healthy"] else "unhealthy")
        for problem in result["problems"]:
            click.echo(f"  {problem}")
    if not result["healthy"]:
        sys.exit(1)


@click.command()
@click.option(
    "--repair",
    is_flag=True,
    help="Ask for what each fault needs: an urgent flush, the poison hash (an operator then "
    "decides), or the owner's reconciliation. Nothing else is changed.",
)
@json_option
def audit(repair: bool, as_json: bool) -> None:
    """Compare every session of the key prefix in Redis with its Postgres row.

    Counts each session as one of: agree, behind_within_bound (dirty, younger than the
    delivery bound), behind_beyond_bound, missing_in_postgres, same_version_other_content,
    postgres_ahead, active_in_ended_owner, terminal_without_ttl, poisoned. Reads in batches
    (bounded memory; progress on a terminal). Exit status 1 when any count but the first
    two is non-zero.
    """
    from agent_sessions.audit import audit as run_audit

    ctx = context(read_only=not repair, as_json=as_json)
    show = sys.stderr.isatty() and not as_json
    try:
        report = run_audit(ctx, repair=repair, progress=_audit_progress if show else None)
    finally:
        ctx.close()
    if show:
        click.echo(err=True)
    result = report.as_dict()
    emit(result, as_json, ctx.settings)
    if not result["ok"]:
        sys.exit(1)


def _audit_progress(sessions: int) -> None:
    click.echo(f"\raudited {sessions:,} sessions", nl=False, err=True)


@click.group()
def cleanup() -> None:
    """End-of-workflow cleanups: list the ones that wait or gave up; retry stuck ones."""


@cleanup.command("list")
@click.option("--limit", default=100, show_default=True, help="Most sessions to list.")
@json_option
def cleanup_list(limit: int, as_json: bool) -> None:
    """Sessions still `cleaning`, and sessions whose cleanup gave up (with the error)."""
    ctx = context(read_only=True, as_json=as_json)
    try:
        waiting = ctx.repo.list_status(SessionStatus.CLEANING, limit=limit)
        failed = ctx.repo.cleanup_failures(limit=limit)
    finally:
        ctx.close()
    emit(
        {
            "waiting": [ctx.cache.keys.session(s.key) for s in waiting],
            "given_up": {ctx.cache.keys.session(s.key): s.cleanup_error for s in failed},
        },
        as_json,
        ctx.settings,
    )


@cleanup.command("retry")
@click.option("--limit", default=1000, show_default=True, help="Most sessions to re-queue.")
@click.option(
    "--force",
    is_flag=True,
    help="Also re-queue sessions whose cleanup counts as under way (its job waits in the "
    "queue or for a retry, or an attempt holds its lease).",
)
def cleanup_retry(limit: int, force: bool) -> None:
    """Queue a cleanup job again for every session still `cleaning` in Postgres (after the
    queue's Redis lost its jobs, or a job failed for good). Sessions whose cleanup is under
    way (queued, waiting for a retry, or running) are left alone unless --force. The
    reconciler does the same on its own for every ended run, once no job of a session is
    under way."""
    from workers.cleanup import drop_marker, request_cleanup

    ctx = context()
    s = ctx.settings
    try:
        waiting = ctx.repo.list_status(SessionStatus.CLEANING, limit=limit)
        queued = 0
        for session in waiting:
            name = ctx.cache.keys.session(session.key)
            if force:
                drop_marker(ctx.queue_redis, s.key_prefix, name, None)
            queued += request_cleanup(
                ctx.cleanup_queue, s.key_prefix, name, session.key, s.cleanup_attempts
            )
    finally:
        ctx.close()
    click.echo(f"cleaning sessions: {len(waiting)}, cleanup jobs queued: {queued}")


@click.command()
@click.argument("action", type=click.Choice(["up", "down", "status"]))
def services(action: str) -> None:
    """Make Redis and Postgres reachable at REDIS_URL / DATABASE_URL (up), stop what `up`
    started (down), or show what answers (status). Starts private servers under .run/ only
    when none answer; installs redis-server or postgresql with apt-get only when missing."""
    if not SERVICES_SCRIPT.exists():
        raise click.ClickException("services needs a source checkout (scripts/services.sh)")
    result = subprocess.run(["bash", str(SERVICES_SCRIPT), action], check=False)
    if result.returncode:
        raise click.ClickException(f"services {action} failed (exit {result.returncode})")
