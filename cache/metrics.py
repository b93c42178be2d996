"""Prometheus metrics, all defined here (one place to read what is measured).

Counters are process-local. Worker pools run in prometheus-client's multiprocess mode
(``agent-sessions worker --metrics-port``), which sums them across the pool's processes.
Backlog gauges are not counted here: :mod:`workers.metrics_server` reads them from Redis at
scrape time, so they are right whichever process made the sessions dirty.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

SAVES = Counter("asc_saves", "Sessions saved to Redis.")
LOADS = Counter("asc_loads", "Session loads, by where they were found.", ["source"])
RETIRES = Counter("asc_retires", "Sessions retired after a failed or cancelled backend run.")
REFUSALS = Counter("asc_refusals", "Saves refused by the store, by reason.", ["reason"])
FLUSH_BATCHES = Counter("asc_flush_batches", "Flush batches written to Postgres.")
FLUSH_ROWS = Counter("asc_flush_rows", "Rows written to Postgres by flushes.")
FLUSH_POISONED = Counter("asc_flush_poisoned", "Sessions parked in a poison hash.")
FLUSH_ERRORS = Counter("asc_flush_errors", "Flush attempts that failed and will be retried.")
FLUSH_SECONDS = Histogram(
    "asc_flush_duration_seconds",
    "Duration of one flush batch (read, write, acknowledge).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CLEANUPS = Counter("asc_cleanups", "Session cleanup attempts, by outcome.", ["outcome"])
POOL_RESTARTS = Counter(
    "asc_pool_restarts", "Processes of a worker pool restarted after they died, by role.", ["role"]
)
