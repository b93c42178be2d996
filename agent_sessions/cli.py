"""``agent-sessions``: the operator's command line.

Every command reads its configuration from the environment (see ``Settings``). Bad input
or bad configuration is one line on stderr and exit status 2; any other error of this
project (a store that failed) is one line and status 1.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
from pydantic import ValidationError
from redis.exceptions import NoPermissionError

from agent_sessions.cli_common import context
from agent_sessions.cli_migrate import migrate
from agent_sessions.cli_ops import audit, cleanup, health, inspect, services, stats
from agent_sessions.cli_poison import poison
from cache.errors import AgentSessionsError, ConfigurationError, InvalidInput
from cache.settings import Settings
from persistence.errors import DatabaseMissing
from workers.preflight import missing_database, services_used


class ConfigurationProblem(click.ClickException):
    """Bad configuration or bad input: one line on stderr, exit status 2 (a usage error)."""

    exit_code = 2


class _Group(click.Group):
    """Our own errors become one line on stderr: exit 2 for configuration, invalid input and
    a permission the Redis user lacks, 1 for everything else (the store failed)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigurationError, InvalidInput) as exc:
            raise ConfigurationProblem(f"{type(exc).__name__}: {exc}") from exc
        except DatabaseMissing as exc:
            raise ConfigurationProblem(_missing_database(exc)) from exc
        except (AgentSessionsError, NoPermissionError) as exc:
            if refused := _permission_problem(exc):
                raise ConfigurationProblem(f"NoPermission: {refused}") from exc
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
        except ValidationError as exc:
            raise ConfigurationProblem(f"invalid configuration: {_first_error(exc)}") from exc


def _permission_problem(exc: BaseException) -> str | None:
    """The line naming the permission Redis refused (``NOPERM``), or ``None``."""
    from workers.preflight import permission_problem

    try:
        prefix = Settings().key_prefix
    except ValidationError:
        prefix = "<ASC_KEY_PREFIX>"
    return permission_problem(exc, prefix)


def _missing_database(exc: DatabaseMissing) -> str:
    """The one line that says the database is missing and how to create it."""
    failure = missing_database(exc.database_url)
    return f"{type(failure).__name__}: {failure}"


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version``: the package's version and the schema revision this build migrates to."""
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import version

    from persistence.schema import HEAD

    click.echo(f"agent-sessions {version('agent-session-cache')} (database schema {HEAD})")
    ctx.exit()


_SERVICE_URLS = {"REDIS_URL", "RQ_REDIS_URL", "DATABASE_URL", "AGENT_BACKEND_URL"}


def _first_error(exc: ValidationError) -> str:
    """``VARIABLE: problem`` of the first invalid setting, named as the user sets it."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "settings"
    if where.startswith("ASC_") and where[4:] in _SERVICE_URLS:
        where = where[4:]
    elif where in Settings.model_fields:
        where = f"ASC_{where.upper()}"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_version,
    help="Show the version and the database schema revision it needs, and exit.",
)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Redis hot cache with Postgres write-behind for workflow Agent-node sessions.

    Configuration comes from the environment: REDIS_URL, RQ_REDIS_URL, DATABASE_URL,
    AGENT_BACKEND_URL and ASC_* (see the README's configuration table).

    Exit status: 0 success, 1 an error of the store (one line on stderr), 2 a usage,
    input or configuration error, or a permission Redis refused (one line on stderr).
    """
    from workers.logs import configure_command_logging

    configure_command_logging(say_bad_format=ctx.invoked_subcommand != "worker")


main.add_command(migrate)


@main.command()
@click.option("-n", "--processes", default=2, show_default=True, help="RQ worker processes.")
@click.option("--burst", is_flag=True, help="Exit once the queues are empty (for scripts).")
@click.option(
    "--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port."
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the metrics endpoint listens on (0.0.0.0 for a remote Prometheus).",
)
def worker(processes: int, burst: bool, metrics_port: int | None, metrics_host: str) -> None:
    """Run the RQ worker pool (flush and cleanup jobs), the flush trigger and RQ's
    scheduler, each a process the pool restarts within a second if it dies.

    The trigger enqueues a flush for every shard whose oldest dirty session is older than
    ASC_FLUSH_DELAY_MS; the workers write those sessions to Postgres and run the cleanup
    jobs of ended workflows. Before anything starts, the pool checks Redis, the queue's
    Redis, Postgres, the database's schema (`agent-sessions migrate`) and the metrics port;
    a failed check is one line and exit status 2. Logs go to stderr at ASC_LOG_LEVEL
    (default INFO), as text or, with ASC_LOG_FORMAT=json, one JSON object per line.

    Stop with SIGTERM or Ctrl-C, to the pool or its whole process group: every process
    exits within 10 s (a running flush finishes or is abandoned unacknowledged, a cleanup
    waiting on the backend is queued again); a second signal kills them at once. Exit
    status 1 if a process kept dying (5 times in a minute).
    """
    from workers.pool import run_pool

    if processes < 1:
        raise click.BadParameter("must be at least 1", param_hint="--processes")
    if metrics_port is not None and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _restart_in_multiprocess_mode()
    status = run_pool(
        Settings(),
        processes=processes,
        burst=burst,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    sys.exit(status)


def _restart_in_multiprocess_mode() -> None:
    """prometheus-client picks its mode at import, so start again with the directory set
    (the pool removes it when it stops)."""
    from workers.metrics_server import make_metrics_dir

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = make_metrics_dir()
    argv = [sys.executable, "-m", "agent_sessions", *sys.argv[1:]]
    os.execv(sys.executable, argv)  # noqa: S606


@main.command()
@click.option("--wait", "wait", is_flag=True, help="Flush here until nothing is dirty.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait may take.")
@click.option(
    "--threads",
    type=click.IntRange(1, 16),
    default=None,
    help="Flusher threads for --wait [default: ASC_FLUSH_THREADS, 2].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def flush(wait: bool, timeout: float, threads: int | None, as_json: bool) -> None:
    """Flush dirty sessions to Postgres now.

    Without --wait, enqueue an urgent flush job for every shard with dirty sessions (the
    workers do the writing). With --wait, flush in this process until nothing is dirty:
    use it before a deploy or a Redis shutdown. Exit status 1 if sessions are left dirty or
    parked in the poison hashes (`agent-sessions poison list`): Postgres lacks their Redis
    version, so shutting Redis down without persistence would lose them.
    """
    if threads is not None and not wait:
        raise click.UsageError("--threads applies to --wait only (the workers flush otherwise)")
    ctx = context(as_json=as_json)
    try:
        if not wait:
            _warn_without_workers(ctx)
        result = _drain(ctx, timeout, threads) if wait else _enqueue_all(ctx)
    finally:
        ctx.close()
    if as_json:
        click.echo(json.dumps({"using": services_used(ctx.settings), **result}))
    else:
        click.echo(" ".join(f"{k}={v}" for k, v in result.items()))
    if wait and (result["left"] or result["parked"]):
        sys.exit(1)


def _warn_without_workers(ctx: Any) -> None:
    from rq import Worker

    if not Worker.count(queue=ctx.flush_queue):
        click.echo(
            f"warning: no worker serves {ctx.flush_queue.name}: nothing runs these jobs until "
            "`agent-sessions worker` starts (`flush --wait` flushes here instead)",
            err=True,
        )


def _drain(ctx: Any, timeout: float, threads: int | None) -> dict[str, Any]:
    from workers.drain import drain

    def progress(left: int) -> None:
        click.echo(f"dirty sessions left: {left}", err=True)

    report = drain(ctx, timeout_s=timeout, progress=progress, threads=threads)
    return {
        "drained": report.drained,
        "written": report.written,
        "poisoned": report.poisoned,
        "left": report.left,
        "parked": report.parked,
    }


def _enqueue_all(ctx: Any) -> dict[str, Any]:
    from workers.drain import dirty_total
    from workers.queues import FlushRequest

    pending = dirty_total(ctx)
    requests = [ctx.request_flush(shard) for shard, _ in pending]
    return {
        "dirty": sum(c for _, c in pending),
        "shards": len(pending),
        "enqueued": requests.count(FlushRequest.ENQUEUED),
        "pending": requests.count(FlushRequest.PENDING),
    }


main.add_command(inspect)
main.add_command(stats)
main.add_command(health)
main.add_command(audit)
main.add_command(cleanup)
main.add_command(services)
main.add_command(poison)


# --- demo ------------------------------------------------------------------------------------
_POSITIVE = click.IntRange(min=1)
_RATE = click.FloatRange(0.0, 1.0)


@main.command()
@click.option("--runs", default=24, show_default=True, type=_POSITIVE, help="Workflow runs.")
@click.option("--nodes", default=3, show_default=True, type=_POSITIVE, help="Agent nodes per loop.")
@click.option(
    "--iterations", default=15, show_default=True, type=_POSITIVE, help="Loop iterations per run."
)
@click.option(
    "--conversations",
    default=12,
    show_default=True,
    type=click.IntRange(min=0),
    help="Chat conversations beside the workflow runs.",
)
@click.option(
    "--turns", default=12, show_default=True, type=_POSITIVE, help="Turns per conversation."
)
@click.option(
    "--config-switch-every",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="Every Nth conversation switches its agent's config half-way (0: none).",
)
@click.option(
    "--threads",
    default=4,
    show_default=True,
    type=_POSITIVE,
    help="Workflow runs and conversations at a time.",
)
@click.option(
    "--fail-rate",
    default=0.05,
    show_default=True,
    type=_RATE,
    help="Share of agent runs that fail (the session is retired).",
)
@click.option(
    "--cancel-rate",
    default=0.03,
    show_default=True,
    type=_RATE,
    help="Share of agent runs that are cancelled (retired too).",
)
@click.option(
    "--pause-rate",
    default=0.05,
    show_default=True,
    type=_RATE,
    help="Share that pause the workflow; the node's next entry resumes it.",
)
@click.option(
    "--workers", default=2, show_default=True, type=click.IntRange(1, 32), help="RQ workers."
)
@click.option(
    "--prefix",
    default=None,
    help="Redis key prefix the demo owns [default: ASC_KEY_PREFIX plus -demo: asc-demo].",
)
@click.option("--seed", type=int, help="Seed of the failure/pause mix (default: random).")
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=1.0),
    help="Seconds to wait for the write-behind to drain and the cleanups to finish.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON line.")
def demo(as_json: bool, **options: Any) -> None:
    """Drive a loop-heavy workload through the real stack, then verify Postgres.

    Migrates DATABASE_URL, starts the loopback fake agent backend and a worker pool, runs
    workflow runs and chat conversations concurrently (Agent nodes in a loop; conversation
    turns, some switching the agent's config half-way; with failed, cancelled and paused
    agent runs), ends them, waits for the write-behind, checks that Postgres holds exactly the final
    state of every session and that every cleanup ran, and reports latency, coalescing and
    flush lag. It touches only its own key prefix and a tenant id unique to the run.
    Exit status 1 if verification fails.
    """
    from agent_sessions.demo import DemoConfig
    from agent_sessions.demo import main as run_demo

    try:
        config = DemoConfig(**options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    sys.exit(run_demo(config, as_json=as_json))
