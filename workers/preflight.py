"""What ``agent-sessions worker`` checks before it starts any process.

Each failed check is one :class:`StartupCheckFailed` line that says what to do (the CLI
prints it and exits with status 2), instead of a pool whose processes log a traceback on
every pass: Redis or the queue's Redis does not answer, or its user's ACL lacks a key
pattern or RQ's pub/sub channels (:func:`permission_problem` names which), Postgres does not
answer, the database does not exist, its schema is not at this build's newest migration, or
the metrics port is taken. A missing agent backend is not an error (cleanups are then only
marked locally), nor is autovacuum off for the sessions table (dead row versions pile up and
queries go without statistics: :func:`persistence.schema.autovacuum_advice`), but each is
said once, at start.
"""

from __future__ import annotations

import logging
import os
import re
import socket

from redis.exceptions import NoPermissionError
from rq import Queue
from sqlalchemy.engine import make_url

from cache import keys
from cache.client import safe_url
from cache.errors import StartupCheckFailed, StoreUnavailable
from cache.settings import Settings
from persistence.errors import DatabaseMissing, PersistenceError, PersistenceUnavailable
from persistence.schema import autovacuum_advice, schema_state
from workers.context import WorkerContext

log = logging.getLogger(__name__)

PUBSUB_PROBE = "rq:pubsub:asc-permission-check"
"""A channel in RQ's pub/sub namespace that no worker listens on: publishing to it checks the
permission RQ's workers need (``&rq:pubsub:*``) and reaches nobody."""
ACL_ADVICE = "see the README's ACL recipe"
_COMMAND = re.compile(r"permissions to run the '([^']+)' command")


def checked_context(settings: Settings, metrics: tuple[str, int] | None = None) -> WorkerContext:
    """The pool's context, built once every check passed; :class:`StartupCheckFailed` if one
    failed (nothing was started, nothing written)."""
    if metrics is not None:
        check_port_free(*metrics)
    ctx = connected_context(settings)
    try:
        _check_queue_redis(ctx)
        check_schema(settings.database_url)
    except BaseException:
        ctx.close()
        raise
    log.info("%s", using_line(settings))
    try:
        advice = autovacuum_advice(settings.database_url)
    except PersistenceError as exc:  # advice only: a failed look is no reason not to start
        log.info("autovacuum not checked: %s", exc)
        advice = None
    if advice:
        log.warning("%s", advice)
    if not settings.agent_backend_url:
        log.warning(
            "AGENT_BACKEND_URL is unset: cleanups only mark sessions cleaned here; "
            "their layers stay on the agent backend"
        )
    return ctx


def services_used(settings: Settings, *, redis: bool = True) -> dict[str, str]:
    """What a process works on, passwords masked: ``redis`` (and ``queue_redis`` when
    ``RQ_REDIS_URL`` names another), ``key_prefix``, ``database``."""
    found: dict[str, str] = {}
    if redis:
        found["redis"] = safe_url(settings.redis_url)
        if settings.queue_redis_url != settings.redis_url:
            found["queue_redis"] = safe_url(settings.queue_redis_url)
    found["key_prefix"] = settings.key_prefix
    found["database"] = make_url(settings.database_url).render_as_string(hide_password=True)
    return found


def using_line(settings: Settings, *, redis: bool = True) -> str:
    """``using redis <url>, key prefix <prefix>, database <url>``."""
    names = {"queue_redis": "queue redis", "key_prefix": "key prefix"}
    used = services_used(settings, redis=redis)
    return "using " + ", ".join(f"{names.get(k, k)} {v}" for k, v in used.items())


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
    try:
        check_database(database_url)
    except PersistenceUnavailable as exc:
        shown = make_url(database_url).render_as_string(hide_password=True)
        raise StartupCheckFailed(f"DATABASE_URL {shown} does not answer: {exc}") from exc


def check_database(database_url: str) -> None:
    """The database exists and its schema is at this build's head; a Postgres that does not
    answer is left to the caller (:class:`PersistenceUnavailable`: an outage, not a setup
    mistake)."""
    try:
        state = schema_state(database_url)
    except DatabaseMissing as exc:
        raise missing_database(database_url) from exc
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


def missing_database(database_url: str) -> StartupCheckFailed:
    """The one line that says a database is missing and how to create it."""
    url = make_url(database_url)
    shown = url.render_as_string(hide_password=True)
    user = f" -U {url.username}" if url.username else ""
    createdb = f"createdb -h {url.host or 'localhost'} -p {url.port or 5432}{user} {url.database}"
    return StartupCheckFailed(
        f"DATABASE_URL {shown}: database {url.database!r} does not exist; create it "
        f"(`agent-sessions services up` for a local one, or `{createdb}`), then run "
        "`agent-sessions migrate`"
    )


def permission_problem(exc: BaseException, key_prefix: str) -> str | None:
    """One line naming the permission the Redis user lacks, when ``exc`` or what caused it
    is Redis refusing a command for its ACL (``NOPERM``); ``None`` for any other error.

    Redis does not say which key or channel it refused, so a refused key names the two key
    patterns the project needs (this prefix's and RQ's), a refused channel RQ's channels.
    """
    refusal = _refusal_in(exc)
    if refusal is None:
        return None
    said = str(refusal)
    if command := _COMMAND.search(said):
        what, need = f"run {command.group(1).upper()}", f"+{command.group(1)}"
    elif "channel" in said:
        what, need = "use RQ's pub/sub channels (its workers take commands there)", "&rq:pubsub:*"
    else:
        what, need = "use a key it needs", f"~{key_prefix}:* and ~rq:*"
    return f"the Redis user may not {what}: its ACL needs {need} ({ACL_ADVICE}; Redis said: {said})"


def _refusal_in(exc: BaseException) -> NoPermissionError | None:
    seen: BaseException | None = exc
    for _ in range(10):  # the causes of a wrapped error; never a long chain
        if seen is None or isinstance(seen, NoPermissionError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def connected_context(settings: Settings) -> WorkerContext:
    """A context whose store reached Redis; :class:`StartupCheckFailed` naming ``REDIS_URL``
    when Redis does not answer or refuses its user a permission."""
    try:
        return WorkerContext.from_settings(settings)
    except StoreUnavailable as exc:
        refused = permission_problem(exc, settings.key_prefix)
        url = safe_url(settings.redis_url)
        if refused is not None:
            raise StartupCheckFailed(f"REDIS_URL {url}: {refused}") from exc
        raise StartupCheckFailed(f"REDIS_URL {url} does not answer: {exc}") from exc


def _check_queue_redis(ctx: WorkerContext) -> None:
    """The queue's Redis answers and lets this user use what the workers use: RQ's keys,
    this prefix's keys and RQ's pub/sub channels."""
    connection, prefix = ctx.queue_redis, ctx.settings.key_prefix
    try:
        connection.ping()
        connection.exists(Queue.redis_queues_keys, keys.flush_backoff(prefix))
        connection.publish(PUBSUB_PROBE, "")
    except Exception as exc:  # redis-py's errors; nothing else is raised by these
        url = safe_url(ctx.settings.queue_redis_url)
        refused = permission_problem(exc, prefix)
        if refused is not None:
            raise StartupCheckFailed(f"RQ_REDIS_URL {url}: {refused}") from exc
        raise StartupCheckFailed(f"RQ_REDIS_URL {url} does not answer: {exc}") from exc
