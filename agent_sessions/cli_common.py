"""What every ``agent-sessions`` command shares: its context, what it says it used, and how it
prints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import click

from cache.settings import Settings
from persistence.errors import PersistenceUnavailable
from workers.context import WorkerContext
from workers.preflight import check_database, services_used, using_line

SchemaCheck = Literal["required", "if_it_answers", "none"]
"""How a command checks the database before it works: ``required`` (a Postgres that does not
answer is an error of the store, exit 1), ``if_it_answers`` (a command that does not need
Postgres: only a missing database or schema is refused), ``none``."""


def context(
    *, read_only: bool = False, as_json: bool = False, schema: SchemaCheck = "required"
) -> WorkerContext:
    """The command's context. Human output starts with the line that names the Redis, the key
    prefix and the database (``--json`` output carries them as ``using``, see :func:`emit`).

    A database that does not exist, or whose schema is not at this build's head, is one line
    and exit status 2 that says how to fix it (:func:`workers.preflight.check_database`).
    ``read_only`` builds a store that records nothing when it starts (the commands that only
    look must write nothing to Redis or Postgres)."""
    settings = Settings()
    if not as_json:
        click.echo(using_line(settings))
    ctx = WorkerContext.from_settings(settings, read_only=read_only)
    try:
        _check_schema(settings, schema)
    except BaseException:
        ctx.close()
        raise
    return ctx


def _check_schema(settings: Settings, schema: SchemaCheck) -> None:
    if schema == "none":
        return
    try:
        check_database(settings.database_url)
    except PersistenceUnavailable:
        if schema == "required":
            raise


@dataclass(frozen=True, slots=True)
class JsonBlock:
    """A value the outline prints as indented JSON under its key (``--json`` unwraps it)."""

    value: Any

    def lines(self, pad: str) -> list[str]:
        text = json.dumps(self.value, indent=2, ensure_ascii=False, default=str)
        return [f"{pad}{line}" for line in text.splitlines()]


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, JsonBlock) else str(value)


def full_payloads_as_json(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with each side's whole snapshot and layer specs (``--full``) printed as JSON
    in the outline, so that a state's types survive (``"1"`` beside ``1``, empty lists)."""
    shown = dict(result)
    for side in ("redis", "postgres"):
        found = shown.get(side)
        if not isinstance(found, dict) or not isinstance(found.get("snapshot"), dict):
            continue
        summary = found["snapshot"]
        blocks = {k: JsonBlock(summary[k]) for k in _PAYLOADS if k in summary}
        shown[side] = {**found, "snapshot": {**summary, **blocks}}
    return shown


def emit(data: dict[str, Any], as_json: bool, settings: Settings) -> None:
    """``data`` as one JSON object with ``using`` added, or as an indented outline."""
    if as_json:
        payload = {"using": services_used(settings), **data}
        click.echo(json.dumps(payload, indent=None, sort_keys=True, default=_plain))
    else:
        for line in _outline(data, 0):
            click.echo(line)


def _outline(data: Any, depth: int) -> list[str]:
    pad = "  " * depth
    if isinstance(data, dict):
        lines = []
        for key, value in data.items():
            if isinstance(value, JsonBlock):
                lines += [f"{pad}{key}:", *value.lines(pad + "  ")]
            elif isinstance(value, dict | list | tuple) and value:
                lines += [f"{pad}{key}:", *_outline(value, depth + 1)]
            else:
                lines.append(f"{pad}{key}: {_scalar(value)}")
        return lines
    if isinstance(data, list | tuple):
        lines = []
        for item in data:
            inner = _outline(item, depth + 1)
            lines += [f"{pad}- {inner[0].lstrip()}", *inner[1:]] if inner else [f"{pad}-"]
        return lines
    return [f"{pad}{_scalar(data)}"]


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


_PAYLOADS = ("snapshot", "layer_specs")

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
