"""What the store may log of a Redis URL, and how it reports redis-py's errors."""

from __future__ import annotations

import pytest
import redis

from cache.client import safe_url, translate_errors
from cache.errors import StoreOutOfMemory, StoreUnavailable


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("redis://app:s3cret@host:6379/0", "redis://app:***@host:6379/0"),
        ("redis://:p%40ss@host/1", "redis://:***@host/1"),
        ("rediss://app:pw@h:1/0?ssl_cert_reqs=none", "rediss://app:***@h:1/0?ssl_cert_reqs=none"),
        (
            "unix:///run/r.sock?db=0&password=pw&username=app",
            "unix:///run/r.sock?db=0&password=***&username=app",
        ),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://app@host/0", "redis://app@host/0"),
        ("unix:///run/r.sock?db=0", "unix:///run/r.sock?db=0"),
    ],
)
def test_a_password_is_masked_and_the_rest_kept(url: str, logged: str) -> None:
    assert safe_url(url) == logged


@pytest.mark.parametrize(
    ("error", "kind", "unknown", "says"),
    [
        (redis.exceptions.OutOfMemoryError("OOM"), StoreOutOfMemory, False, "over maxmemory"),
        (redis.ConnectionError("Connection reset"), StoreUnavailable, True, "unavailable"),
        (redis.ConnectionError("Error connecting to h:1"), StoreUnavailable, False, "unavailable"),
        (redis.TimeoutError("Timeout reading"), StoreUnavailable, True, "unavailable"),
        (redis.ResponseError("WRONGTYPE"), StoreUnavailable, False, "refused the command"),
    ],
    ids=["oom", "lost-after-sending", "never-connected", "timeout", "refused"],
)
def test_redis_errors_become_store_errors_naming_what_was_done(
    error: redis.RedisError, kind: type[Exception], unknown: bool, says: str
) -> None:
    with pytest.raises(kind) as caught, translate_errors("saving s:1"):
        raise error
    assert str(caught.value).startswith("saving s:1: Redis ")
    assert says in str(caught.value)
    assert caught.value.__cause__ is error
    assert getattr(caught.value, "outcome_unknown", False) is unknown


def test_other_errors_and_success_pass_through() -> None:
    with pytest.raises(KeyError), translate_errors("loading"):
        raise KeyError("x")
    with translate_errors("loading"):
        pass
