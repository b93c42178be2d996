"""The shape of a log line: ISO-8601 times, text or one JSON object, the exception kept."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime

import pytest

from cache.errors import ConfigurationError
from workers.logs import JsonFormatter, TextFormatter, log_format


def record(exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord(
        "workers.pool",
        logging.ERROR,
        __file__,
        1,
        "worker %s \x1b[32mgone\x1b[0m",
        ("w1",),
        exc_info,
    )


def test_a_text_line_starts_with_an_iso_time_with_the_date() -> None:
    line = TextFormatter().format(record())
    when, rest = line.split(" ", 1)
    assert datetime.fromisoformat(when).utcoffset() is not None and "T" in when
    assert rest.startswith("workers.pool ERROR: worker w1")


def test_a_json_line_is_one_object_with_the_exception_and_no_colour_codes() -> None:
    line = JsonFormatter().format(record(exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert set(entry) == {"time", "level", "logger", "message", "exception"}
    assert (entry["level"], entry["logger"]) == ("ERROR", "workers.pool")
    assert entry["message"] == "worker w1 gone"
    assert entry["exception"].startswith("Traceback") and "ValueError: boom" in entry["exception"]
    assert datetime.fromisoformat(entry["time"]).utcoffset() is not None


def test_a_json_line_without_an_exception_has_no_exception_field() -> None:
    assert "exception" not in json.loads(JsonFormatter().format(record()))


@pytest.mark.parametrize(("value", "fmt"), [("", "text"), ("JSON", "json"), (" text ", "text")])
def test_the_log_format_setting(value: str, fmt: str) -> None:
    assert log_format({"ASC_LOG_FORMAT": value}) == fmt


def test_an_unknown_log_format_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="ASC_LOG_FORMAT: must be text or json"):
        log_format({"ASC_LOG_FORMAT": "xml"})
