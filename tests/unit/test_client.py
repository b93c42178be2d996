"""What the store may log of a Redis URL."""

from __future__ import annotations

import pytest

from cache.client import safe_url


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
