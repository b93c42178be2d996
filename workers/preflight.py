"""What ``agent-sessions worker`` checks before it starts any process.

Each failed check is one :class:`StartupCheckFailed` line that says what to do (the CLI
prints it and exits with status 2), instead of a pool whose processes log a traceback on
every pass: Redis or the queue's Redis does not answer, Postgres does not answer, the
database does not exist, its schema is not at this build's newest migration, or the metrics
port is taken. A missing agent backend is not an error (cleanups are then only marked
locally), but it is said once, at start.
"""

from __future__ import annotations

import logging
import os
import socket

from sqlalchemy.engine import make_url

from cache.client import safe_url
from cache.errors import StartupCheckFailed, StoreUnavailable
from cache.settings import Settings
from persistence.errors import DatabaseMissing, PersistenceUnavailable
from persistence.migrate import schema_state
from workers.context import WorkerContext

log = logging.getLogger(__name__)


def checked_context(settings: Settings, metrics: tuple[str, int] | None = None) -> WorkerContext:
    """The pool's context, built once every check passed; :class:`StartupCheckFailed` if one
    failed (nothing was started, nothing written)."""
    if metrics is not None:
        check_port_free(*metrics)
    ctx = _context(settings)
    try:
        _check_queue_redis(ctx)
        check_schema(settings.database_url)
    except BaseException:
        ctx.close()
        raise
    if not settings.agent_backend_url:
        log.warning(
            "AGENT_BACKEND_URL is unset: cleanups only mark sessions cleaned here; "
            "their layers stay on the agent backend"
        )
    return ctx


def check_port_free(host: str, port: int) -> None:
    """The metrics endpoint can listen on ``host:port`` (it is bound again by its process)."""
    try:
        socket.create_server((host, port)).close()
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartupCheckFailed(
            f"--metrics-port {port}: cannot listen on {host}:{port} ({why}); "
            "choose another port or stop what uses it"
        ) from exc


def check_schema(database_url: str) -> None:
    """Postgres answers, the database exists and its schema is at this build's head."""
    shown = make_url(database_url).render_as_string(hide_password=True)
    try:
        state = schema_state(database_url)
    except DatabaseMissing as exc:
        url = make_url(database_url)
        raise StartupCheckFailed(
            f"DATABASE_URL {shown}: database {url.database!r} does not exist; create it "
            f"(`agent-sessions services up` for a local one, or `createdb -h {url.host} "
            f"-p {url.port or 5432} -U {url.username} {url.database}`), then run "
            "`agent-sessions migrate`"
        ) from exc
    except PersistenceUnavailable as exc:
        raise StartupCheckFailed(f"DATABASE_URL {shown} does not answer: {exc}") from exc
    if not state.known:
        raise StartupCheckFailed(
            f"the database schema is at revision {state.current}, which this build does not "
            f"know (its newest is {state.head}): a newer build migrated it; run that build"
        )
    if not state.at_head:
        raise StartupCheckFailed(
            f"the database schema is at revision {state.current or 'none (empty database)'}, "
            f"this build needs {state.head}: run `agent-sessions migrate`"
        )


def _context(settings: Settings) -> WorkerContext:
    try:
        return WorkerContext.from_settings(settings)
    except StoreUnavailable as exc:
        raise StartupCheckFailed(
            f"REDIS_URL {safe_url(settings.redis_url)} does not answer: {exc}"
        ) from exc


def _check_queue_redis(ctx: WorkerContext) -> None:
    try:
        ctx.queue_redis.ping()
    except Exception as exc:  # redis-py's errors; nothing else is raised by a ping
        url = safe_url(ctx.settings.queue_redis_url)
        raise StartupCheckFailed(f"RQ_REDIS_URL {url} does not answer: {exc}") from exc
