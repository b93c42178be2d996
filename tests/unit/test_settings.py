"""Settings: environment names, defaults and the checks that refuse a bad configuration."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cache.settings import Settings


def test_conventional_service_urls_and_asc_names_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/2")
    monkeypatch.setenv("DATABASE_URL", "postgresql://db/sessions")
    monkeypatch.setenv("ASC_SHARDS", "64")
    monkeypatch.setenv("ASC_FLUSH_DELAY_MS", "250")
    settings = Settings()
    assert settings.redis_url == "redis://cache:6379/2"
    assert settings.queue_redis_url == "redis://cache:6379/2"  # RQ defaults to REDIS_URL
    assert settings.database_url == "postgresql://db/sessions"
    assert (settings.shards, settings.flush_delay_ms) == (64, 250)


def test_a_batch_of_maximal_snapshots_must_fit_one_postgres_value() -> None:
    assert Settings().flush_batch * Settings().max_snapshot_bytes <= 1000 * 1024 * 1024
    with pytest.raises(ValidationError, match="lower ASC_FLUSH_BATCH"):
        Settings(flush_batch=1000)
    assert Settings(flush_batch=1000, max_snapshot_bytes=1024 * 1024).flush_batch == 1000


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("shards", 0),
        ("key_prefix", "a:b"),
        ("key_prefix", ""),
        ("redis_url", " "),
        ("flush_batch", 0),
    ],
)
def test_bad_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        Settings(**{field: value})  # type: ignore[arg-type]
