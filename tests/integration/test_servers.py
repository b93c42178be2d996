"""The fixtures of tests/conftest.py and helpers of tests/servers.py start real, working servers."""

from __future__ import annotations

import psycopg
import pytest
import redis
from redis.exceptions import RedisClusterException, ResponseError

from tests.servers import (
    Database,
    PostgresServer,
    RedisCluster,
    RedisServer,
    cluster_info,
    database_exists,
    fresh_database,
    pg_answers,
)

SAME_SLOT_SCRIPT = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[2])"

# --------------------------------------------------------------------------------- Redis


def test_private_redis_answers_and_stores(redis_client: redis.Redis, redis_url: str) -> None:
    assert redis_url.startswith("unix://")
    assert redis_client.ping() is True
    redis_client.set("k", b"v\x00bytes")
    assert redis_client.get("k") == b"v\x00bytes"


def test_redis_client_starts_empty(redis_client: redis.Redis) -> None:
    assert redis_client.dbsize() == 0


def test_redis_server_kill_and_restart_keeps_fsynced_aof() -> None:
    with RedisServer(["--appendonly", "yes", "--appendfsync", "always"]) as server:
        with server.client() as client:
            client.set("survives", "1")
        server.kill()
        assert not server.running
        server.start()
        with server.client() as client:
            assert client.get("survives") == b"1"
        server.restart()
        assert server.running


# --------------------------------------------------------------------------------- Cluster


def test_cluster_is_ok_on_every_node(redis_cluster: RedisCluster) -> None:
    for port in redis_cluster.ports:
        with redis_cluster.node_client(port) as node:
            info = cluster_info(node)
        assert info["cluster_state"] == "ok"
        assert info["cluster_known_nodes"] == "3"


def test_cluster_runs_hash_tagged_multi_key_eval(cluster_client: redis.RedisCluster) -> None:
    cluster_client.set("{s001}b", "from-b")
    assert cluster_client.eval(SAME_SLOT_SCRIPT, 2, "{s001}a", "{s001}b", "x") == b"from-b"
    assert cluster_client.get("{s001}a") == b"x"


def test_cluster_refuses_keys_of_different_slots(
    redis_cluster: RedisCluster, cluster_client: redis.RedisCluster
) -> None:
    with pytest.raises(RedisClusterException):  # the client refuses to route it
        cluster_client.eval(SAME_SLOT_SCRIPT, 2, "{s001}a", "{s002}b", "x")
    node = redis_cluster.node_client(redis_cluster.ports[0])  # and so does the server (CROSSSLOT)
    with node, pytest.raises(ResponseError, match="same slot"):
        node.eval(SAME_SLOT_SCRIPT, 2, "{s001}a", "{s002}b", "x")


def test_cluster_client_starts_empty(cluster_client: redis.RedisCluster) -> None:
    assert cluster_client.dbsize() == 0


# --------------------------------------------------------------------------------- Postgres


def test_fresh_database_accepts_ddl(database_url: Database, pg_server_url: str) -> None:
    assert database_url.name.startswith("asc_test_")
    assert database_url.sqlalchemy_url.startswith("postgresql+psycopg://")
    with psycopg.connect(database_url.url) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO t VALUES (1, 'x')")
        assert conn.execute("SELECT current_database(), body FROM t").fetchone() == (
            database_url.name,
            "x",
        )
    assert database_exists(pg_server_url, database_url.name)


def test_fresh_database_is_dropped_even_while_connected(pg_server_url: str) -> None:
    with fresh_database(pg_server_url) as database:
        conn = psycopg.connect(database.url)  # still open at exit: WITH (FORCE) must cope
    assert not database_exists(pg_server_url, database.name)
    conn.close()


def test_fresh_database_clones_a_template(pg_server_url: str) -> None:
    with fresh_database(pg_server_url, prefix="asc_tmpl_") as template:
        with psycopg.connect(template.url) as conn:
            conn.execute("CREATE TABLE migrated (id int)")
        with (
            fresh_database(pg_server_url, template=template.name) as clone,
            psycopg.connect(clone.url) as conn,
        ):
            assert conn.execute("SELECT count(*) FROM migrated").fetchone() == (0,)


def test_private_postgres_stops_and_starts_again(private_postgres: PostgresServer) -> None:
    url = private_postgres.url
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    private_postgres.stop()
    assert not private_postgres.running
    assert not pg_answers(url, timeout=1)
    private_postgres.start()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT v FROM kept").fetchone() == (42,)


def test_private_postgres_survives_a_crash(private_postgres: PostgresServer) -> None:
    url = private_postgres.url
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("CREATE TABLE crashed (v int)")
    conn.execute("INSERT INTO crashed VALUES (7)")
    private_postgres.kill()
    assert not private_postgres.running
    assert not pg_answers(url, timeout=1)
    conn.close()
    private_postgres.start()  # crash recovery replays the WAL
    with psycopg.connect(url) as conn2:
        assert conn2.execute("SELECT v FROM crashed").fetchone() == (7,)
