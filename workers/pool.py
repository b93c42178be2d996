"""``agent-sessions worker``: an RQ worker pool on our queues, plus the flush trigger.

Equivalent plain RQ command for the pool part (the trigger then has to run elsewhere)::

    rq worker-pool asc-flush asc-cleanup -n 2 -u "$RQ_REDIS_URL" -S rq.serializers.JSONSerializer

Queues are served in order, so flush jobs go before cleanup jobs (which wait on the agent
backend). On a busy system run a second pool on ``asc-cleanup`` alone.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from typing import Any

from rq import Worker
from rq.serializers import JSONSerializer
from rq.worker_pool import WorkerPool

from cache.settings import Settings
from workers.context import WorkerContext
from workers.metrics_server import serve_metrics
from workers.queues import queue_connection, queue_names
from workers.trigger import run_trigger

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL_S = 15
JOB_MONITORING_INTERVAL_S = 5
DEQUEUE_TIMEOUT_S = 2


class SessionWorker(Worker):
    """An RQ worker that finds abandoned jobs within seconds and stops promptly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
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
        run_trigger(WorkerContext.from_settings(settings), stop)
    except KeyboardInterrupt:
        stop.set()


def run_pool(
    settings: Settings, *, processes: int, burst: bool = False, metrics_port: int | None = None
) -> None:
    """Run ``processes`` RQ workers and one trigger process until interrupted."""
    if metrics_port is not None:
        serve_metrics(metrics_port, WorkerContext.from_settings(settings).cache)
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
