"""``agent-sessions poison``: the operator's remedy for sessions the flush parked.

A session lands in its shard's poison hash when Postgres refused it (bad data), when
Postgres is ahead of Redis or holds another lineage of it, or when its Redis hash cannot be
decoded. It then stays in Redis without a TTL and is not flushed again. The choices:

* ``retry`` once the cause is fixed (a schema or constraint change, a Postgres row repaired):
  the session goes back to the backlog and the next flush tries it;
* ``drop`` to give up the Redis copy: the hash is deleted and Postgres's copy (if any) is
  what the next entry reads back. This is how a corrupt hash stops failing its node.
"""

from __future__ import annotations

from typing import Any

import click

from agent_sessions.cli_common import context, emit, full_payloads_as_json, json_option
from agent_sessions.inspection import inspect_session
from cache.errors import CorruptValue
from cache.records import SessionKey
from workers.context import WorkerContext


def parked(ctx: WorkerContext, limit: int) -> dict[str, dict[str, Any]]:
    """Up to ``limit`` parked sessions: key name → shard, reason and Redis version/status."""
    cache = ctx.cache
    found: dict[str, dict[str, Any]] = {}
    for shard in cache.poison_sizes(list(cache.keys.all_shards())):
        for name, reason in cache.poison(shard).items():
            if len(found) >= limit:
                return found
            version, status = cache.client.hmget(name, ["version", "status"])
            found[name] = {
                "shard": shard,
                "reason": reason,
                "version": _text(version),
                "status": _text(status),
            }
    return found


def _text(value: object) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else None


def _key(ctx: WorkerContext, name: str) -> SessionKey:
    """The session a KEY names (``InvalidId``, one line and exit 2, if it names none)."""
    return ctx.cache.keys.parse_session(name)


@click.group()
def poison() -> None:
    """Sessions the flush parked (Postgres refused them, or they could not be decoded):
    list them, show one, send one back to the flush, or drop its Redis copy."""


@poison.command("list")
@click.option("--limit", default=1000, show_default=True, help="Most sessions to list.")
@json_option
def poison_list(limit: int, as_json: bool) -> None:
    """Every parked session: its key, shard, why it was parked, its Redis version/status."""
    ctx = context(read_only=True, as_json=as_json)
    try:
        found = parked(ctx, limit)
    finally:
        ctx.close()
    if as_json or found:
        emit({"parked": found}, as_json, ctx.settings)
    else:
        click.echo("no parked sessions")


@poison.command("show")
@click.argument("key")
@click.option("--full", is_flag=True, help="Include the whole snapshot and layer specs.")
@json_option
def poison_show(key: str, full: bool, as_json: bool) -> None:
    """One parked session (KEY as `poison list` prints it): the reason beside the session in
    Redis and in Postgres. A Redis copy that cannot be decoded is shown as its error."""
    ctx = context(read_only=True, as_json=as_json)
    try:
        session_key = _key(ctx, key)
        shard = ctx.cache.keys.shard_of_key(session_key)
        reason = ctx.cache.poison(shard).get(key)
        try:
            detail = inspect_session(ctx, session_key, full=full)
        except CorruptValue as exc:
            detail = {
                "key": key,
                "redis": {"corrupt": str(exc)},
                "postgres": _row(ctx, session_key),
            }
    finally:
        ctx.close()
    if reason is None:
        raise click.ClickException(f"{key} is not parked in the poison hash")
    emit(full_payloads_as_json({"reason": reason, **detail}), as_json, ctx.settings)


def _row(ctx: WorkerContext, key: SessionKey) -> dict[str, Any] | None:
    row = ctx.repo.get(key)
    return None if row is None else {"status": row.status.value, "version": row.version}


@poison.command("retry")
@click.argument("keys", nargs=-1, metavar="[KEY]...")
@click.option("--all", "every", is_flag=True, help="Retry every parked session.")
@click.option(
    "--keep-redis",
    is_flag=True,
    help="Take the Redis copy over Postgres's row (a session parked because Redis went back "
    "in time, or Postgres holds another save at its version): the row is replaced.",
)
@json_option
def poison_retry(keys: tuple[str, ...], every: bool, keep_redis: bool, as_json: bool) -> None:
    """Send parked sessions back to the flush (after fixing why Postgres refused them).

    A session parked because its history diverged from Postgres's is refused again unless
    --keep-redis says which side wins (`poison drop` lets Postgres's copy win instead)."""
    _apply("retry-keep-redis" if keep_redis else "retry", keys, every, as_json)


@poison.command("drop")
@click.argument("keys", nargs=-1, metavar="[KEY]...")
@click.option("--all", "every", is_flag=True, help="Drop every parked session.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
def poison_drop(keys: tuple[str, ...], every: bool, yes: bool, as_json: bool) -> None:
    """Delete parked sessions' Redis copies; Postgres's copy (if any) is what their next
    entry reads back. Unflushed changes of those sessions are lost."""
    if not yes:
        what = "every parked session" if every else f"{len(keys)} parked session(s)"
        click.confirm(f"Delete the Redis copy of {what}?", abort=True, err=True)
    _apply("drop", keys, every, as_json)


def _act(ctx: WorkerContext, action: str, name: str) -> bool:
    if action == "drop":
        return ctx.cache.drop_poisoned(name)
    if action == "retry":
        return ctx.cache.retry_poisoned(name)
    row = ctx.repo.get(ctx.cache.keys.parse_session(name))
    version = None if row is None else row.version
    return ctx.cache.retry_poisoned(name, keep_redis=True, postgres_version=version)


def _apply(action: str, keys: tuple[str, ...], every: bool, as_json: bool) -> None:
    if bool(keys) == every:
        raise click.UsageError("give KEY arguments or --all (not both)")
    ctx = context(as_json=as_json)
    try:
        names = list(parked(ctx, 10**9)) if every else list(keys)
        for name in names:
            _key(ctx, name)
        done = {name: _act(ctx, action, name) for name in names}
    finally:
        ctx.close()
    if as_json:
        emit({"action": action, "sessions": done}, True, ctx.settings)
        return
    for name, ok in done.items():
        click.echo(f"{action}: {name}" if ok else f"not parked (left alone): {name}")
    missed = [name for name, ok in done.items() if not ok]
    if missed:
        raise click.ClickException(f"{len(missed)} of {len(done)} were not parked")
