"""A write is sent once, on a standalone Redis and on a cluster: a save whose reply was lost is
never resent (it could apply twice and then look like a conflict the node lost); ``finish``
says the outcome is unknown, and the next entry reads what Redis holds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from agent_backend.models import CreateRunRequest
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.outcomes import RunOutcome
from cache.client import client_options
from cache.records import Snapshot
from cache.settings import Settings
from cache.store import RedisSessionCache
from tests import factories as f
from tests.integration.support import make_ctx, node_composition
from tests.integration.tcp_proxy import TcpProxy
from tests.servers import Database, RedisCluster, RedisServer, free_port
from workers.context import WorkerContext

REQUEST = CreateRunRequest(composition=node_composition())


def outcome(content: str) -> RunOutcome:
    snapshot = f.snapshot(state={"content": content})
    return RunOutcome("succeeded", f"backend-{content}", REQUEST, snapshot)


def content(snapshot: Snapshot | None) -> object:
    assert snapshot is not None
    return snapshot.decoded().layers[0].runtime_state["content"]


def a_reply_lost_after_the_save_applied(lc: SessionLifecycle, drop_next_reply: object) -> None:
    """The second save's reply is dropped; it is reported unknown, not a conflict, not false."""
    scope = f.scope()
    first = lc.finish(scope, lc.enter(scope), outcome("A"))
    assert first.metadata["session_snapshot_persisted"] is True and first.version == 1
    entry = lc.enter(scope)
    drop_next_reply()  # type: ignore[operator]
    lost = lc.finish(scope, entry, outcome("B"))
    assert not lost.conflict, "the save was sent twice and met itself"
    assert lost.metadata["session_snapshot_persisted"] is None
    assert lost.metadata["session_store_error_type"] == "StoreUnavailable"
    after = lc.enter(scope)  # the save was applied; the next entry sees it
    assert after.version == 2 and content(after.snapshot) == "B"


def test_on_standalone_a_lost_reply_is_unknown_and_not_resent(
    redis_client: redis.Redis, migrated: Database
) -> None:
    port = free_port()
    with RedisServer(["--port", str(port)]) as server, TcpProxy(("127.0.0.1", port)) as proxy:
        del server
        ctx = make_ctx(proxy.url, migrated.url)
        a_reply_lost_after_the_save_applied(SessionLifecycle(ctx), proxy.drop_next_reply)


@pytest.fixture
def proxied_cluster(redis_cluster: RedisCluster) -> Iterator[tuple[list[TcpProxy], dict]]:
    """A proxy in front of every primary, and the address map that routes through them."""
    flush = redis_cluster.client()
    flush.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    flush.close()
    proxies = [TcpProxy(("127.0.0.1", port)) for port in redis_cluster.ports]
    remap = {
        ("127.0.0.1", port): p.address for port, p in zip(redis_cluster.ports, proxies, strict=True)
    }
    try:
        yield proxies, remap
    finally:
        for proxy in proxies:
            proxy.close()


def test_on_a_cluster_a_lost_reply_is_unknown_and_not_resent(
    redis_cluster: RedisCluster,
    proxied_cluster: tuple[list[TcpProxy], dict],
    redis_client: redis.Redis,
    redis_url: str,
    migrated: Database,
) -> None:
    """Before, redis-py's cluster client resent the script after the lost reply: the node was
    told ``conflict=True`` (expected version 1, stored version 2) about its own save."""
    proxies, remap = proxied_cluster
    settings = Settings(
        redis_url=redis_cluster.url,
        redis_cluster=True,
        rq_redis_url=redis_url,
        database_url=migrated.url,
        shards=4,
    )
    client = redis.RedisCluster(
        startup_nodes=redis_cluster.startup_nodes,
        address_remap=lambda address: remap.get(address, address),
        **client_options(settings),
    )
    base = make_ctx(redis_url, migrated.url)
    ctx = WorkerContext(
        settings,
        RedisSessionCache(client, settings),
        base.repo,
        base.queue_redis,
        base.flush_queue,
        base.cleanup_queue,
        None,
    )

    def drop_next_reply() -> None:
        for proxy in proxies:
            proxy.drop_next_reply()

    try:
        a_reply_lost_after_the_save_applied(SessionLifecycle(ctx), drop_next_reply)
    finally:
        ctx.cache.close()
