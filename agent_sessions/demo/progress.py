"""The demo's progress on stderr: a bar on a terminal, plain lines anywhere else.

A click progress bar written to a pipe or a file prints its label and nothing else; there
the demo prints what it starts, how far it is every :data:`PLAIN_EVERY_S`, and how it ended.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

import click

PLAIN_EVERY_S = 5.0
LABEL_WIDTH = 12


@contextlib.contextmanager
def progress(label: str, total: int, items: str, done: str) -> Iterator[Callable[[int], None]]:
    """Yields ``update(count)``, to call with how many of ``total`` ``items`` are ``done``.

    On a terminal, a bar; elsewhere ``<label>: <total> <items>`` at the start, ``<label>:
    <count> of <total> <items> <done>`` every few seconds while it moves, and the same with
    the time taken at the end.
    """
    if sys.stderr.isatty():
        with click.progressbar(
            length=total, label=f"{label:<{LABEL_WIDTH}}", file=sys.stderr
        ) as bar:
            yield lambda count: bar.update(count - bar.pos)
        return
    plain = _Plain(label, total, items, done)
    click.echo(f"{label}: {total} {items}", err=True)
    yield plain.update
    click.echo(f"{plain.line()} in {time.monotonic() - plain.started:.1f} s", err=True)


class _Plain:
    """The lines of :func:`progress` off a terminal."""

    def __init__(self, label: str, total: int, items: str, done: str) -> None:
        self.label, self.total, self.items, self.done = label, total, items, done
        self.count = 0
        self.started = self.said = time.monotonic()

    def update(self, count: int) -> None:
        moved, self.count = count != self.count, count
        if moved and time.monotonic() - self.said >= PLAIN_EVERY_S:
            self.said = time.monotonic()
            click.echo(self.line(), err=True)

    def line(self) -> str:
        return f"{self.label}: {self.count} of {self.total} {self.items} {self.done}"
