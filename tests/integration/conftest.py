"""Fixtures of the integration tests that need workers, Postgres or the fake backend.

They are defined in ``support.py`` next to the helpers they use; importing them here
registers them for every module of this folder.
"""

from __future__ import annotations

from tests.integration.support import (  # noqa: F401  (fixtures are registered by import)
    backend_fixture,
    close_contexts_fixture,
    fake_fixture,
    migrated_fixture,
    start_worker_fixture,
)
