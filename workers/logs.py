"""How the project's processes log: the one place that configures logging, for the worker
pool's processes and for the command line.

One handler on stderr serves the project's loggers and RQ's, so that everything a pool
prints has the same shape: text lines (``2026-05-09T07:35:25.123+00:00 workers.pool INFO:
...``) or, with ``ASC_LOG_FORMAT=json``, one JSON object per line with ``time``, ``level``,
``logger``, ``message`` and, when there is one, ``exception`` (the formatted traceback).
Times are ISO-8601 in UTC with milliseconds, like every time the project stores.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final, Literal, cast

from cache.errors import ConfigurationError

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final = ("text", "json")
LOG_FORMAT_ENV: Final = "ASC_LOG_FORMAT"
LOGGERS: Final = (
    "agent_backend",
    "agent_sessions",
    "cache",
    "persistence",
    "workers",
    "rq",
    "py.warnings",
)
"""The loggers the handler serves: the project's packages, RQ's (RQ then adds no handler of
its own, which would print its lines on stdout in another shape) and Python's warnings."""
_OWN_HIERARCHY: Final = ("rq", "py.warnings")
"""Loggers whose records are printed here only, not again by a handler of the root."""
SERVER_CHECKS_LOGGER: Final = "cache.server_checks"
HANDLER_NAME: Final = "agent-sessions-stderr"
TEXT_FORMAT: Final = "%(asctime)s %(name)s %(levelname)s: %(message)s"
_ANSI: Final = re.compile(r"\x1b\[[0-9;]*m")


def iso_time(created: float) -> str:
    """A record's time as ISO-8601 UTC text with milliseconds."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``<ISO time> <logger> <LEVEL>: <message>``, a traceback on the lines below."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_time(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": _ANSI.sub("", record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_format(environ: Mapping[str, str] | None = None) -> LogFormat:
    """``ASC_LOG_FORMAT`` (``text`` when unset); :class:`ConfigurationError` if it is neither
    ``text`` nor ``json``."""
    env = os.environ if environ is None else environ
    value = env.get(LOG_FORMAT_ENV, "").strip().lower() or "text"
    if value not in LOG_FORMATS:
        raise ConfigurationError(f"{LOG_FORMAT_ENV}: must be text or json, got {value!r}")
    return cast(LogFormat, value)


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure_logging(level: str | int, fmt: LogFormat, *, startup_advice: bool = True) -> None:
    """Print the project's and RQ's log lines at ``level`` and above on stderr, in ``fmt``.

    Calling it again changes the level and the format. A logger the application configured
    keeps its own handlers. ``startup_advice=False`` (the pool's children) drops the lines of
    :mod:`cache.server_checks`: the pool's parent ran the same checks and printed them once.
    """
    handler = _handler()
    handler.setFormatter(formatter(fmt))
    logging.captureWarnings(True)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if handler not in logger.handlers:
            logger.addHandler(handler)
        if name in _OWN_HIERARCHY:
            logger.propagate = False
    checks = logging.getLogger(SERVER_CHECKS_LOGGER)
    for old in [f for f in checks.filters if isinstance(f, _DropAll)]:
        checks.removeFilter(old)
    if not startup_advice:
        checks.addFilter(_DropAll())


def _handler() -> logging.Handler:
    """This process's stderr handler (made once)."""
    for existing in logging.getLogger(LOGGERS[0]).handlers:
        if existing.get_name() == HANDLER_NAME:
            return existing
    handler = logging.StreamHandler()
    handler.set_name(HANDLER_NAME)
    return handler


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def configure_command_logging(*, say_bad_format: bool = True) -> None:
    """Logging for a command of the CLI: warnings and errors only (a command's result is its
    output; ``worker`` raises the level to ``ASC_LOG_LEVEL``), in ``ASC_LOG_FORMAT``. A bad
    format falls back to text, said in one warning unless ``say_bad_format`` is false (the
    caller refuses it itself, as ``worker`` does)."""
    try:
        fmt = log_format()
    except ConfigurationError as exc:
        configure_logging(logging.WARNING, "text")
        if say_bad_format:
            logging.getLogger(__name__).warning("%s; printing text", exc)
        return
    configure_logging(logging.WARNING, fmt)
