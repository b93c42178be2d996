"""Settings that tell: an ``ASC_*`` variable no setting reads is said, with the closest one;
and what a command used is named with its passwords masked."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from cache import settings as settings_module
from cache.settings import Settings, known_variables, unknown_variables
from workers.preflight import services_used, using_line


@pytest.fixture(autouse=True)
def said_afresh() -> Iterator[None]:
    """Each test starts as a new process would: nothing said yet."""
    settings_module._warn_unknown.cache_clear()
    yield
    settings_module._warn_unknown.cache_clear()


def test_a_misspelt_setting_names_the_closest_one() -> None:
    lines = unknown_variables(["ASC_PREFIX", "asc_flush_dely_ms", "ASC_NOTHING_LIKE_IT", "PATH"])
    assert lines == [
        "ASC_NOTHING_LIKE_IT is not a setting of agent-session-cache and is ignored; "
        "the README's Configuration table lists the settings",
        "ASC_PREFIX is not a setting of agent-session-cache and is ignored; "
        "did you mean ASC_KEY_PREFIX?",
        "asc_flush_dely_ms is not a setting of agent-session-cache and is ignored; "
        "did you mean ASC_FLUSH_DELAY_MS?",
    ]


def test_every_setting_and_alias_is_known() -> None:
    known = known_variables()
    assert {"ASC_KEY_PREFIX", "ASC_REDIS_URL", "ASC_DATABASE_URL", "ASC_LOG_FORMAT"} <= known
    assert all(f"ASC_{name.upper()}" in known for name in Settings.model_fields)
    assert unknown_variables(known) == []


def test_an_embedder_hears_it_through_logging_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ASC_PREFIX", "nc1")
    with caplog.at_level(logging.WARNING, logger="cache.settings"):
        Settings()
        Settings()  # a process builds settings more than once: said once
    said = [r for r in caplog.records if r.name == "cache.settings"]
    assert [r.getMessage() for r in said] == [
        "ASC_PREFIX is not a setting of agent-session-cache and is ignored; "
        "did you mean ASC_KEY_PREFIX?"
    ]
    assert said[0].levelno == logging.WARNING


def test_what_a_command_used_is_named_with_passwords_masked() -> None:
    settings = Settings(
        redis_url="redis://app:redis-secret@cache:6380/2",
        rq_redis_url="redis://:queue-secret@queue:6379/0",
        database_url="postgresql://app:pg-secret@db:5432/sessions",
        key_prefix="nc1",
    )
    assert services_used(settings) == {
        "redis": "redis://app:***@cache:6380/2",
        "queue_redis": "redis://:***@queue:6379/0",
        "key_prefix": "nc1",
        "database": "postgresql://app:***@db:5432/sessions",
    }
    line = using_line(settings)
    assert line.startswith("using redis redis://app:***@cache:6380/2, queue redis ")
    assert "secret" not in line
    assert using_line(settings, redis=False) == (
        "using key prefix nc1, database postgresql://app:***@db:5432/sessions"
    )
