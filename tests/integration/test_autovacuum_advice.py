"""The worker pool says at start when Postgres will never vacuum or analyze the sessions table.

Every flush updates rows in place, so autovacuum off, on the server or for the table, lets
dead row versions pile up and leaves queries without statistics: worth a warning that names
the fix. (The flush's fence itself no longer depends on statistics:
``tests/integration/test_upsert_plan.py``.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from persistence import migrate
from persistence.engine import create_engine
from persistence.models import TABLE_NAME
from persistence.schema import autovacuum_advice
from tests.integration.support import make_ctx
from tests.servers import Database
from workers.preflight import checked_context


@pytest.fixture
def engine(database_url: Database) -> Iterator[Engine]:
    engine = create_engine(database_url.url)
    yield engine
    engine.dispose()


def server_autovacuum(engine: Engine) -> bool:
    with engine.connect() as conn:
        return conn.execute(sa.text("SHOW autovacuum")).scalar() == "on"


def set_table_autovacuum(engine: Engine, on: bool) -> None:
    change = "RESET (autovacuum_enabled)" if on else "SET (autovacuum_enabled = false)"
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {TABLE_NAME} {change}"))


def test_autovacuum_off_for_the_sessions_table_is_advised_with_the_fix(
    database_url: Database, engine: Engine
) -> None:
    migrate.upgrade(database_url.url)
    set_table_autovacuum(engine, on=False)
    advice = autovacuum_advice(database_url.url)
    assert advice is not None
    assert f"VACUUM (ANALYZE) {TABLE_NAME}" in advice
    where = f"for table {TABLE_NAME}" if server_autovacuum(engine) else "on this server"
    assert f"autovacuum is off {where}" in advice

    set_table_autovacuum(engine, on=True)
    advice = autovacuum_advice(database_url.url)
    assert (advice is None) is server_autovacuum(engine)
    assert advice is None or "autovacuum is off on this server" in advice


def test_a_database_not_migrated_yet_gets_no_advice(database_url: Database) -> None:
    assert autovacuum_advice(database_url.url) is None


def test_the_worker_pool_logs_the_advice_once_at_start(
    redis_client: object, redis_url: str, database_url: Database, engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    migrate.upgrade(database_url.url)
    set_table_autovacuum(engine, on=False)
    settings = make_ctx(redis_url, database_url.url).settings
    with caplog.at_level(logging.WARNING, logger="workers.preflight"):
        checked_context(settings).close()
    said = [r.getMessage() for r in caplog.records if "autovacuum is off" in r.getMessage()]
    assert len(said) == 1, said
