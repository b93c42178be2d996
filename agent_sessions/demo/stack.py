"""The running pieces the demo talks to, and the wait for its write-behind.

The demo's key space is its own: ``--prefix``, or the deployment's ``ASC_KEY_PREFIX`` plus
``-demo`` (``asc-demo`` by default), so that the demo never touches the deployment's sessions,
queues or counters, and an ACL for a deployment can name it (README, "Who may write to Redis").
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import click
from sqlalchemy.engine import make_url

from agent_sessions.demo.backend import BackendProcess
from agent_sessions.demo.progress import progress
from agent_sessions.testing.worker_process import WorkerProcess
from cache.errors import ConfigurationError
from cache.records import SessionStatus, StoredSession
from cache.settings import Settings
from persistence.migrate import upgrade
from workers.context import WorkerContext
from workers.drain import dirty_total
from workers.preflight import connected_context

PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
DEMO_SUFFIX = "-demo"
DRAIN_POLL_S = 0.2


def demo_prefix(prefix: str | None, settings: Settings) -> str:
    """``prefix`` (``--prefix``), or the deployment's prefix plus ``-demo``."""
    chosen = prefix or f"{settings.key_prefix}{DEMO_SUFFIX}"
    if not PREFIX_PATTERN.match(chosen):
        raise ConfigurationError(
            f"the demo's key prefix {chosen!r} is not 1-32 characters of [A-Za-z0-9._-]; "
            "choose one with --prefix"
        )
    return chosen


@dataclass(frozen=True)
class Stack:
    """The demo's context (store, repository, queues), its agent backend and its pool."""

    ctx: WorkerContext
    backend: BackendProcess
    pool: WorkerProcess


@contextlib.contextmanager
def demo_stack(settings: Settings, workers: int) -> Iterator[Stack]:
    """The fake agent backend (its own process), this process's context and a worker pool
    (``workers`` RQ workers, cleaning up on that backend), all stopped on exit.

    Redis is reached first: a refused permission or a Redis that does not answer is one
    line (:func:`~workers.preflight.connected_context`) before anything else is said.
    """
    with BackendProcess() as backend:  # forked before this process starts any thread
        ctx = connected_context(settings)
        try:
            _say(
                f"migrating {make_url(settings.database_url).render_as_string(hide_password=True)}"
            )
            upgrade(settings.database_url, key_prefix=settings.key_prefix)
            configured = settings.model_copy(update={"agent_backend_url": backend.url})
            with WorkerProcess(configured, workers) as pool:
                _say(f"fake agent backend at {backend.url}; worker pool pid {pool.proc.pid}")
                yield Stack(ctx, backend, pool)
        finally:
            ctx.close()


def _say(text: str) -> None:
    click.echo(text, err=True)


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
    with progress("write-behind", len(names), "sessions", "flushed and cleaned up") as update:
        while True:
            settled = count_settled(stack, names)
            update(settled)
            if settled == len(names) and not dirty_total(stack.ctx):
                return True
            if time.monotonic() > deadline or not stack.pool.alive():
                return False
            time.sleep(DRAIN_POLL_S)


def drain_problem(stack: Stack, timeout_s: float) -> str:
    if not stack.pool.alive():
        return f"the worker pool exited with status {stack.pool.proc.returncode}"
    return f"the write-behind did not drain within --timeout {timeout_s:g} s"
