"""``agent-sessions worker``: an RQ worker pool on our queues, plus the flush trigger.

Equivalent plain RQ command for the pool part (the trigger then has to run elsewhere); the
worker class is what refuses jobs that are not ours, so never run these queues without it::

    rq worker-pool asc-flush asc-cleanup -n 2 -u "$RQ_REDIS_URL" \
        -S rq.serializers.JSONSerializer -w workers.pool.SessionWorker

Queues are served in order, so flush jobs go before cleanup jobs (which wait on the agent
backend). On a busy system run a second pool on ``asc-cleanup`` alone.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import threading
from typing import Any

from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker_pool import WorkerPool

from cache.errors import AgentSessionsError
from cache.settings import Settings
from workers.context import WorkerContext, current
from workers.jobs import JOB_FUNCTIONS
from workers.metrics_server import serve_metrics
from workers.queues import queue_connection, queue_names
from workers.trigger import run_trigger

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL_S = 15
JOB_MONITORING_INTERVAL_S = 5
DEQUEUE_TIMEOUT_S = 2
PUBSUB_POLL_S = 1.0
TRIGGER_START_RETRY_S = 2.0
WORKER_GC_THRESHOLDS = (50_000, 20, 20)
_PACKAGES = ("agent_sessions", "cache", "persistence", "workers")
_LOG_HANDLER = "agent-sessions-stderr"
_LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


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

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run only the project's own job functions; drop anything else unrun.

        Whoever can write to the queue's Redis can push a JSON job naming any importable
        function (``os.system``), a callback or a webhook. Such a job is deleted before RQ
        resolves any name in it; the refusal is logged and counted (``foreign_jobs_refused``).
        """
        reason = foreign(job)
        if reason is None:
            super().execute_job(job, queue)
            return
        self.log.error("Worker %s: refused job %s: %s", self.name, job.id, reason)
        self.connection.lrem(queue.intermediate_queue_key, 0, job.id)
        job.delete(remove_from_queue=True)
        current().cache.count(foreign_jobs_refused=1)

    def subscribe(self) -> None:
        """RQ's ``subscribe`` with a pub/sub thread that polls every :data:`PUBSUB_POLL_S`.

        RQ 3.0 polls every 60 s, and its teardown joins the thread without a bound after
        sending UNSUBSCRIBE: when the thread reads that reply before the stop flag is cleared
        (a loaded machine, a group SIGTERM), it goes back to a 60 s wait and the worker's
        stop waits with it. Waiting on the socket costs no Redis traffic.
        """
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=PUBSUB_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    @property
    def dequeue_timeout(self) -> int:
        """RQ waits up to 405 s per dequeue and a stop signal can land on its pubsub thread;
        short waits let an idle worker notice Ctrl-C or SIGTERM within seconds."""
        return DEQUEUE_TIMEOUT_S


def foreign(job: Job) -> str | None:
    """Why ``job`` is not one of ours, or ``None`` if it is."""
    if job.func_name not in JOB_FUNCTIONS or job.instance is not None:
        return f"function {job.func_name!r} is not a job of this project"
    hooks = ("_success_callback_name", "_failure_callback_name", "_stopped_callback_name")
    if any(getattr(job, hook, None) for hook in hooks) or job.webhooks:
        return "it carries a callback or a webhook"
    return None


def log_to_stderr(level: str) -> None:
    """Print the project's own log lines at ``level`` on stderr, as RQ prints its own.

    For the processes ``agent-sessions worker`` runs (the CLI configures no logging, and
    Python's last-resort handler shows warnings only). Once per process; a logger the
    application configured keeps its handlers.
    """
    handler = logging.StreamHandler()
    handler.set_name(_LOG_HANDLER)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
    for name in _PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if all(h.get_name() != _LOG_HANDLER for h in logger.handlers):
            logger.addHandler(handler)


def _trigger_main(settings: Settings) -> None:
    log_to_stderr(settings.log_level)
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
    """Run ``processes`` RQ workers and one trigger process until interrupted.

    The context is built first, so a wrong configuration (an ``allkeys-*`` eviction policy,
    another shard count) stops the command before any process starts.
    """
    log_to_stderr(settings.log_level)
    ctx = WorkerContext.from_settings(settings)
    if metrics_port is not None:
        serve_metrics(metrics_port, ctx.cache, metrics_host)
    else:
        ctx.close()
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
