"""The ``/metrics`` endpoint of a worker pool.

Counters come from every pool process through prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR`` must be set before any process of the pool starts; the CLI
arranges that, in a directory :func:`make_metrics_dir` names after the pool's pid, which
the pool removes when it stops). Backlog gauges are read from Redis at scrape time, so they
describe the whole system, not one process.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from cache.store import RedisSessionCache

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR_PREFIX = "asc-metrics-"
_OWN_DIR = re.compile(rf"^{METRICS_DIR_PREFIX}(\d+)-")


def make_metrics_dir() -> str:
    """A new directory for prometheus-client's multiprocess files, named after this process
    (``asc-metrics-<pid>-<random>`` in the temporary directory), after removing those that
    pools killed before they could remove theirs left behind."""
    remove_stale_metrics_dirs()
    return tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")


def remove_own_metrics_dir() -> None:
    """Remove ``PROMETHEUS_MULTIPROC_DIR`` if :func:`make_metrics_dir` made it for this
    process; a directory the operator set is left alone."""
    path = os.environ.get(MULTIPROC_ENV)
    if path and _owner_pid(Path(path)) == os.getpid():
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_metrics_dirs() -> None:
    """Remove this user's ``asc-metrics-<pid>-*`` directories whose process is gone."""
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*"):
        pid = _owner_pid(path)
        with contextlib.suppress(OSError):
            if pid is not None and path.stat().st_uid == os.getuid() and not _alive(pid):
                shutil.rmtree(path, ignore_errors=True)


def _owner_pid(path: Path) -> int | None:
    match = _OWN_DIR.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
    if os.environ.get(MULTIPROC_ENV):
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
