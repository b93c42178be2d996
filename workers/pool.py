"""``agent-sessions worker``: RQ workers on our queues, the flush trigger, RQ's scheduler and
the metrics endpoint, each a process that :mod:`workers.supervisor` keeps running.

Equivalent plain RQ command for the workers alone (the trigger then has to run elsewhere, and
RQ's own pool neither restarts it nor bounds its stop); the worker class is what refuses jobs
that are not ours, so never run these queues without it::

    rq worker-pool asc-flush asc-cleanup -n 2 -u "$RQ_REDIS_URL" \
        -S rq.serializers.JSONSerializer -w workers.pool.SessionWorker

Queues are served in order, so flush jobs go before cleanup jobs (which wait on the agent
backend). On a busy system run a second pool on ``asc-cleanup`` alone.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import socket
import threading
from datetime import datetime
from typing import Any

import redis
from rq import Queue, SimpleWorker, Worker
from rq.job import Job
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from cache.client import connect
from cache.errors import AgentSessionsError
from cache.metrics import POOL_RESTARTS
from cache.settings import Settings
from cache.store import RedisSessionCache
from workers.context import STOP_REQUESTED, WorkerContext, current
from workers.door import BoundedJob, refusal
from workers.logs import configure_logging, log_format
from workers.metrics_server import remove_own_metrics_dir, serve_metrics
from workers.preflight import checked_context
from workers.queues import queue_connection, queue_names
from workers.supervisor import Child, Supervisor
from workers.trigger import run_trigger, trigger_name

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL_S = 15
JOB_MONITORING_INTERVAL_S = 5
DEQUEUE_TIMEOUT_S = 2
PUBSUB_POLL_S = 1.0
TRIGGER_START_RETRY_S = 2.0
SCHEDULER_LOCK_RETRY_S = 15.0
WORKER_GC_THRESHOLDS = (50_000, 20, 20)
RQ_LOG_LEVEL = "INFO"

WORKER, TRIGGER, SCHEDULER, METRICS = "worker", "flush-trigger", "scheduler", "metrics"
"""The roles of the pool's processes (logs, ``restarts_*`` counters, metric labels)."""


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
        kwargs["job_class"] = BoundedJob
        super().__init__(*args, **kwargs)

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run only the project's own jobs (:mod:`workers.door`); drop anything else unrun,
        before RQ resolves any name in it, and log and count why."""
        settings = current().settings
        refused = refusal(job, frozenset(queue_names(settings.key_prefix)), settings.shards)
        if refused is None:
            super().execute_job(job, queue)
            return
        counter, why = refused
        self.log.error("Worker %s: refused job %s: %s", self.name, job.id, why)
        self.connection.lrem(queue.intermediate_queue_key, 0, job.id)
        job.delete(remove_from_queue=True)
        current().cache.count(**{counter: 1})

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

    def handle_warm_shutdown_request(self) -> None:
        """A stop signal: a job that waits long (a cleanup on the backend) hands its work
        back now instead of holding the stop up (``STOP_REQUESTED``)."""
        STOP_REQUESTED.set()
        super().handle_warm_shutdown_request()  # type: ignore[no-untyped-call]

    @property
    def dequeue_timeout(self) -> int:
        """RQ waits up to 405 s per dequeue and a stop signal can land on its pubsub thread;
        short waits let an idle worker notice Ctrl-C or SIGTERM within seconds."""
        return DEQUEUE_TIMEOUT_S


def log_in_child(settings: Settings) -> None:
    """A child's logging: the pool's level and format, without the start-up advice of the
    store's server checks, which the pool's parent printed once."""
    configure_logging(settings.log_level, log_format(), startup_advice=False)


def register_queues(connection: redis.Redis, prefix: str) -> None:
    """List the prefix's queues in RQ's ``rq:queues`` set, as a first job would: ``rq info``
    then shows both from the pool's start."""
    keys = [Queue(name, connection=connection).key for name in queue_names(prefix)]
    connection.sadd(Queue.redis_queues_keys, *keys)


def run_pool(
    settings: Settings,
    *,
    processes: int,
    burst: bool = False,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> int:
    """Run ``processes`` RQ workers, the flush trigger, RQ's scheduler and (with a port) the
    metrics endpoint until stopped; the exit status (1 after a crash loop).

    Every start-up check runs first (:mod:`workers.preflight`): a wrong configuration, a
    service that does not answer, a database without this build's schema or a taken port
    stops the command before any process starts. With ``burst``, the workers exit once the
    queues are empty and the pool with them. The metrics directory the CLI made for this
    process is removed when the pool ends, however it ends short of a SIGKILL.
    """
    configure_logging(settings.log_level, log_format())
    metrics = (metrics_host, metrics_port) if metrics_port is not None else None
    try:
        ctx = checked_context(settings, metrics)
        try:
            ctx.repo.close()  # the supervisor forks: no Postgres connection may be shared
            register_queues(ctx.queue_redis, settings.key_prefix)
            children = pool_children(settings, processes, burst=burst, metrics=metrics)
            return Supervisor(children, on_restart=functools.partial(_restarted, ctx)).run()
        finally:
            ctx.close()
    finally:
        remove_own_metrics_dir()  # every child is gone: nothing writes there any more


def pool_children(
    settings: Settings, processes: int, *, burst: bool, metrics: tuple[str, int] | None
) -> list[Child]:
    """The pool's processes. A burst's workers are not restarted, and it needs no scheduler
    (each worker enqueues the due retries once before it starts)."""
    pool = os.getpid()
    children = [
        Child(WORKER, functools.partial(_worker_main, settings, slot, burst), slot, not burst)
        for slot in range(1, processes + 1)
    ]
    children.append(Child(TRIGGER, functools.partial(_trigger_main, settings)))
    if not burst:
        name = f"{socket.gethostname()}:{pool}:scheduler"
        children.append(Child(SCHEDULER, functools.partial(_scheduler_main, settings, name)))
    if metrics is not None:
        children.append(Child(METRICS, functools.partial(_metrics_main, settings, *metrics)))
    return children


def worker_name(pid: int, slot: int) -> str:
    """An RQ worker's name, ``host:pid:slot``: ``rq info`` says where each one runs."""
    return f"{socket.gethostname()}:{pid}:{slot}"


def _restarted(ctx: WorkerContext, child: Child, pid: int, how: str) -> None:
    """Count a restart (``stats``: ``restarts_<role>``; ``asc_pool_restarts_total``), and
    forget a dead worker's or trigger's registration at once rather than when it expires."""
    POOL_RESTARTS.labels(child.role).inc()
    ctx.cache.count(**{f"restarts_{child.role.replace('-', '_')}": 1})
    if child.role == WORKER:
        _forget_worker(ctx.queue_redis, worker_name(pid, child.slot))
    elif child.role == TRIGGER:
        ctx.cache.forget_trigger(trigger_name(pid))


def _forget_worker(connection: redis.Redis, name: str) -> None:
    """Register the death of the RQ worker ``name`` if its registration is still there."""
    key = Worker.redis_worker_namespace_prefix + name
    if connection.exists(key) and not connection.hexists(key, "death"):
        dead = Worker.find_by_key(key, connection=connection, serializer=JSONSerializer)
        if dead is not None:
            dead.register_death()  # type: ignore[no-untyped-call]


def _worker_main(settings: Settings, slot: int, burst: bool) -> None:
    log_in_child(settings)
    connection = queue_connection(settings)
    queues = [
        Queue(name, connection=connection, serializer=JSONSerializer)
        for name in queue_names(settings.key_prefix)
    ]
    name = worker_name(os.getpid(), slot)
    _forget_worker(connection, name)  # a namesake of an earlier container's pid is dead
    worker = SessionWorker(queues, name=name, connection=connection)
    worker.work(burst=burst, with_scheduler=burst, logging_level=RQ_LOG_LEVEL)


def _trigger_main(settings: Settings) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    log_in_child(settings)
    ctx = _context_when_reachable(settings, stop)
    if ctx is None:
        return
    try:
        run_trigger(ctx, stop)
    finally:
        ctx.close()


def _context_when_reachable(settings: Settings, stop: threading.Event) -> WorkerContext | None:
    """Build the trigger's context, waiting out an outage instead of dying (``None``: it was
    told to stop first)."""
    while True:
        try:
            return WorkerContext.from_settings(settings)
        except AgentSessionsError as exc:
            log.warning("flush trigger cannot start yet: %s", exc)
            if stop.wait(TRIGGER_START_RETRY_S):
                return None


class PoolScheduler(RQScheduler):
    """RQ's scheduler (it queues the cleanups' retries when their backoff is over), asking
    for the queues' scheduler locks every :data:`SCHEDULER_LOCK_RETRY_S` while another
    scheduler holds them, where RQ waits two minutes: a pool whose scheduler died takes the
    duty over once that scheduler's lock expires (61 s)."""

    @property
    def should_reacquire_locks(self) -> bool:
        if self._queue_names == self.acquired_locks:
            return False
        since = self.lock_acquisition_time
        return since is None or (datetime.now() - since).total_seconds() > SCHEDULER_LOCK_RETRY_S


def _scheduler_main(settings: Settings, name: str) -> None:
    """One scheduler per pool, named after the pool: a restarted one refreshes its own lock."""
    log_in_child(settings)
    scheduler = PoolScheduler(
        queue_names(settings.key_prefix),
        connection=queue_connection(settings),
        serializer=JSONSerializer,
        name=name,
    )
    scheduler.work()  # type: ignore[no-untyped-call]


def _metrics_main(settings: Settings, host: str, port: int) -> None:
    log_in_child(settings)
    cache = RedisSessionCache(connect(settings), settings)
    try:
        serve_metrics(port, cache, host)
    finally:
        cache.close()
