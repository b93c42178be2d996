"""Loads the Lua scripts of ``lua/`` and maps their result codes to outcomes.

Each script is registered once per store instance as a redis-py ``Script`` (EVALSHA, with
a reload on NOSCRIPT). The file, the method that calls it and the attribute holding it share
one stem. :func:`check_code` is the one place where a code becomes an exception.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from typing import Any, Final

from redis.commands.core import Script

from cache.errors import BacklogFull, RunEnded, RunUnknown, ScriptContractError, VersionConflict

SCRIPT_NAMES = (
    "save",
    "retire",
    "end_owner",
    "begin_cleanup",
    "mark_cleaned",
    "ack_flush",
    "fill",
    "quarantine",
    "take_lock",
    "release_lock",
    "begin_flush",
    "open_owner",
    "settle_owner",
    "note_cleanup",
    "retry_poisoned",
    "drop_poisoned",
    "mark_flushing",
)


class Code(IntEnum):
    """Result codes shared by every script (each file's header lists the ones it returns)."""

    OK = 0
    OWNER_ENDED = 1
    VERSION_CONFLICT = 2
    BACKLOG_FULL = 3
    NOOP = 4
    EXISTS = 5
    OWNER_UNKNOWN = 6


OK: Final = frozenset({Code.OK})
OK_OR_NOOP: Final = frozenset({Code.OK, Code.NOOP})
"""The codes most store methods accept from their script (``check_code``'s ``allowed``)."""


PRELUDE = "prelude"
"""``lua/prelude.lua``: helpers written once and put into every script (see :func:`source`)."""


def _file(name: str) -> str:
    return resources.files("lua").joinpath(f"{name}.lua").read_text(encoding="utf-8")


@functools.cache
def prelude_line() -> str:
    """The prelude joined into one line: comments and indentation dropped. Its rules (each
    statement on lines of its own, whole-line comments, no ``--`` in a string) make the
    join safe; a line that breaks them is refused here rather than loaded."""
    code = []
    for line in _file(PRELUDE).splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("--"):
            continue
        if "--" in stripped:
            raise ScriptContractError(f"prelude.lua: a comment after code: {line!r}")
        code.append(stripped)
    return " ".join(code)


def source(name: str) -> str:
    """The text of ``lua/<name>.lua`` as it is loaded: the prelude's helpers put at the start
    of its second line (after the ``#!lua`` shebang), so every line keeps its number."""
    text = _file(name)
    shebang, newline, rest = text.partition("\n")
    if not shebang.startswith("#!lua"):
        raise ScriptContractError(f"{name}.lua does not start with a #!lua shebang")
    return f"{shebang}{newline}{prelude_line()} {rest}"


@dataclass(frozen=True, slots=True)
class Scripts:
    """The registered scripts of one store instance."""

    save: Script
    retire: Script
    end_owner: Script
    begin_cleanup: Script
    mark_cleaned: Script
    ack_flush: Script
    fill: Script
    quarantine: Script
    take_lock: Script
    release_lock: Script
    begin_flush: Script
    open_owner: Script
    settle_owner: Script
    note_cleanup: Script
    retry_poisoned: Script
    drop_poisoned: Script
    mark_flushing: Script

    @classmethod
    def register(cls, client: Any) -> Scripts:
        return cls(*(client.register_script(source(name)) for name in SCRIPT_NAMES))


def check_code(
    script: str, reply: Any, allowed: frozenset[Code], *, key: str = "", expected: int = 0
) -> tuple[Code, list[Any]]:
    """Split a script reply into its code and values; raise for a refusal or an unknown code."""
    if not isinstance(reply, list) or not reply or not isinstance(reply[0], int):
        raise ScriptContractError(f"{script}: malformed reply {reply!r}")
    try:
        code = Code(reply[0])
    except ValueError:
        raise ScriptContractError(f"{script}: unknown result code {reply[0]!r}") from None
    if code not in allowed:
        raise ScriptContractError(f"{script}: result code {code.name} is not one it returns")
    values = reply[1:]
    if code is Code.OWNER_ENDED and script == "save":
        raise RunEnded(f"{key}: its owner (workflow run or conversation) has ended")
    if code is Code.OWNER_UNKNOWN:
        raise RunUnknown(f"{key}: Redis has no marker of its owner")
    if code is Code.VERSION_CONFLICT:
        raise VersionConflict(key, expected, _count(script, values))
    if code is Code.BACKLOG_FULL:
        raise BacklogFull(key, _count(script, values))
    return code, values


def _count(script: str, values: list[Any]) -> int:
    if not values or not isinstance(values[0], int):
        raise ScriptContractError(f"{script}: a refusal without its integer value: {values!r}")
    return values[0]
