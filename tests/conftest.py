"""Shared fixtures: real, private servers (see tests/servers.py).  No Docker, no mocks.

Redis
  ``redis_server`` / ``redis_url`` (session)  a private redis-server on a unix socket
  ``redis_client`` (function)                 bytes client for it, FLUSHALL before each test
                                              (tests using only ``redis_url`` get no flush)
  ``redis_cluster`` (session, lazy)           a private 3-primary Redis Cluster
  ``cluster_client`` (function)               redis.RedisCluster client, every primary flushed

PostgreSQL
  ``pg_server_url`` (session)  the server of $DATABASE_URL (the shared one) when it answers,
                               otherwise a private PostgresServer started for the session
  ``pg_template`` (session)    HOOK: name of a database that every ``database_url`` is cloned
                               from, or None for an empty database.  To give every test a migrated
                               schema, override it (here or in a sub-directory conftest) with a
                               fixture that creates + migrates a template database once and
                               returns its name (and drops it at the end of the session).
  ``database_url`` (function)  a fresh ``asc_test_<hex>`` database (a ``servers.Database`` with
                               ``.url`` and ``.sqlalchemy_url``), dropped after the test
  ``private_postgres`` (function)  a private PostgresServer for tests that stop/kill/start it

A server that cannot be started FAILS the test (pytest.fail), it never skips: `make services`
can always provide the binaries, so a failure here means a broken machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import redis

from tests.servers import (
    Database,
    PostgresServer,
    RedisCluster,
    RedisServer,
    ServerError,
    fresh_database,
    pg_answers,
    with_database,
)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/agent_sessions"

T = TypeVar("T")


def _start(what: str, factory: Callable[[], T]) -> T:
    """``factory()``, with a ServerError turned into a clear test failure (never a skip)."""
    try:
        return factory()
    except ServerError as exc:
        message = f"cannot start {what}: {exc}"
    pytest.fail(message, pytrace=False)


# --------------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with _start("a private redis-server", RedisServer) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushall()  # private server: safe
    with client:
        yield client


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    with _start("a private Redis Cluster", RedisCluster) as cluster:
        yield cluster


@pytest.fixture
def cluster_client(redis_cluster: RedisCluster) -> Iterator[redis.RedisCluster]:
    client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)  # private cluster: safe
    with client:
        yield client


# --------------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    shared = with_database(os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL, "postgres")
    if pg_answers(shared):
        yield shared
        return
    with _start(f"a private PostgreSQL ({shared} does not answer)", PostgresServer) as server:
        yield server.url


@pytest.fixture(scope="session")
def pg_template(pg_server_url: str) -> str | None:
    """Hook: the database each ``database_url`` is cloned from (None: an empty database)."""
    return None


@pytest.fixture
def database_url(pg_server_url: str, pg_template: str | None) -> Iterator[Database]:
    with fresh_database(pg_server_url, template=pg_template) as database:
        yield database


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    with _start("a private PostgreSQL", PostgresServer) as server:
        yield server
