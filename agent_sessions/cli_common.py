"""What every ``agent-sessions`` command shares: its context and how it prints."""

from __future__ import annotations

import json
from typing import Any

import click

from cache.settings import Settings
from workers.context import WorkerContext


def context() -> WorkerContext:
    return WorkerContext.from_settings(Settings())


def emit(data: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=None, sort_keys=True, default=str))
    else:
        for line in _outline(data, 0):
            click.echo(line)


def _outline(data: Any, depth: int) -> list[str]:
    pad = "  " * depth
    if isinstance(data, dict):
        lines = []
        for key, value in data.items():
            if isinstance(value, dict | list) and value:
                lines += [f"{pad}{key}:", *_outline(value, depth + 1)]
            else:
                lines.append(f"{pad}{key}: {_scalar(value)}")
        return lines
    if isinstance(data, list):
        lines = []
        for item in data:
            inner = _outline(item, depth + 1)
            lines += [f"{pad}- {inner[0].lstrip()}", *inner[1:]] if inner else [f"{pad}-"]
        return lines
    return [f"{pad}{_scalar(data)}"]


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
