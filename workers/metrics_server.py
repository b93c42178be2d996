"""The ``/metrics`` endpoint of a worker pool.

Counters come from every pool process through prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR`` must be set before any process of the pool starts; the CLI
arranges that). Backlog gauges are read from Redis at scrape time, so they describe the
whole system, not one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from cache.store import RedisSessionCache


class BacklogCollector(Collector):
    """Dirty backlog, oldest dirty age and poison count, read from Redis per scrape."""

    def __init__(self, cache: RedisSessionCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        shards = list(self.cache.keys.all_shards())
        backlog = self.cache.shard_backlog(shards)
        now_ms = self.cache.server_time_ms()
        oldest = [since for _, _, since in backlog if since is not None]
        age = (now_ms - min(oldest)) / 1000 if oldest else 0.0
        yield GaugeMetricFamily(
            "asc_dirty_sessions", "Sessions waiting for Postgres.", sum(c for _, c, _ in backlog)
        )
        yield GaugeMetricFamily(
            "asc_dirty_oldest_age_seconds", "Age of the oldest session waiting for Postgres.", age
        )
        poisoned = sum(self.cache.poison_sizes(shards).values())
        yield GaugeMetricFamily("asc_poison_sessions", "Sessions Postgres refused.", poisoned)


def serve_metrics(port: int, cache: RedisSessionCache, host: str = "127.0.0.1") -> None:
    """Serve the pool's metrics on ``host:port`` in this thread until the process ends
    (the pool runs it as a process of its own)."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(BacklogCollector(cache))
    app = make_wsgi_app(registry)
    with make_server(host, port, app, server_class=_Server, handler_class=_Quiet) as server:
        server.serve_forever()


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per scrape, so a stalled client cannot hold the others up."""

    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: object) -> None:
        return
