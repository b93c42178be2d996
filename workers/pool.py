"""``agent-sessions worker``: an RQ worker pool on our queues, plus the flush trigger.

Equivalent plain RQ command for the pool part (the trigger then has to run elsewhere)::

    rq worker-pool asc-flush asc-cleanup -n 2 -u "$RQ_REDIS_URL" -S rq.serializers.JSONSerializer

Queues are served in order, so flush jobs go before cleanup jobs (which wait on the agent
backend). On a busy system run a second pool on ``asc-cleanup`` alone.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import threading
from typing import Any

from rq import SimpleWorker
from rq.serializers import JSONSerializer
from rq.worker_pool import WorkerPool

from cache.errors import AgentSessionsError
from cache.settings import Settings
from workers.context import WorkerContext
from workers.metrics_server import serve_metrics
from workers.queues import queue_connection, queue_names
from workers.trigger import run_trigger

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL_S = 15
JOB_MONITORING_INTERVAL_S = 5
DEQUEUE_TIMEOUT_S = 2
TRIGGER_START_RETRY_S = 2.0
WORKER_GC_THRESHOLDS = (50_000, 20, 20)


class SessionWorker(SimpleWorker):
    """An RQ worker that runs jobs in its own process, finds abandoned jobs within seconds
    and stops promptly.

    In-process (``SimpleWorker``) rather than a forked horse per job: the job context
    (Redis pool, Postgres engine, backend client) is then built once per worker instead of
    once per job, which saved a Postgres connect on every flush. RQ still enforces
    ``job_timeout`` with its signal-based death penalty.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A flush decodes a few hundred snapshots of nested dicts at once; with the default
        # threshold (700 allocations) the cyclic collector rescans them over and over, which
        # measured as half of the decode time. Our records hold no reference cycles.
        gc.set_threshold(*WORKER_GC_THRESHOLDS)
        kwargs.setdefault("maintenance_interval", MAINTENANCE_INTERVAL_S)
        kwargs.setdefault("job_monitoring_interval", JOB_MONITORING_INTERVAL_S)
        kwargs["serializer"] = JSONSerializer
        super().__init__(*args, **kwargs)

    @property
    def dequeue_timeout(self) -> int:
        """RQ waits up to 405 s per dequeue and a stop signal can land on its pubsub thread;
        short waits let an idle worker notice Ctrl-C or SIGTERM within seconds."""
        return DEQUEUE_TIMEOUT_S


def _trigger_main(settings: Settings) -> None:
    stop = threading.Event()
    try:
        run_trigger(_context_when_reachable(settings, stop), stop)
    except KeyboardInterrupt:
        stop.set()


def _context_when_reachable(settings: Settings, stop: threading.Event) -> WorkerContext:
    """Build the trigger's context, waiting out an outage at start instead of dying."""
    while True:
        try:
            return WorkerContext.from_settings(settings)
        except AgentSessionsError as exc:
            log.warning("flush trigger cannot start yet: %s", exc)
            if stop.wait(TRIGGER_START_RETRY_S):
                raise KeyboardInterrupt from exc


def run_pool(
    settings: Settings,
    *,
    processes: int,
    burst: bool = False,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> None:
    """Run ``processes`` RQ workers and one trigger process until interrupted."""
    if metrics_port is not None:
        serve_metrics(metrics_port, WorkerContext.from_settings(settings).cache, metrics_host)
    trigger = multiprocessing.get_context("spawn").Process(
        target=_trigger_main, args=(settings,), name="asc-flush-trigger", daemon=True
    )
    trigger.start()
    try:
        pool = WorkerPool(
            queue_names(settings.key_prefix),
            connection=queue_connection(settings),
            num_workers=processes,
            worker_class=SessionWorker,
            serializer=JSONSerializer,
        )
        pool.start(burst=burst, logging_level="INFO")
    finally:
        trigger.terminate()
        trigger.join(timeout=5)
