"""The worker pool's processes: how a worker stops, how the pool supervises its children."""

from __future__ import annotations

import threading

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from tests.integration.support import wait_for
from workers.pool import SessionWorker

STOP_BOUND_S = 10.0
"""Every process of the pool exits within this long of a stop signal (README, Worker pool)."""


def test_a_worker_stops_its_pubsub_thread_even_after_the_thread_saw_the_unsubscribe(
    redis_client: redis.Redis,
) -> None:
    """RQ 3.0's pub/sub thread waits 60 s per poll, and a worker's teardown joins it with no
    bound: when the thread reads the UNSUBSCRIBE reply before the stop flag is cleared (what
    a loaded machine does), it goes back to a 60 s wait and the worker's stop waits with it.
    The order is forced here; the worker must still stop at once."""
    queue = Queue("pool-test", connection=redis_client, serializer=JSONSerializer)
    worker = SessionWorker([queue], connection=redis_client, name="pool-test-worker")
    worker.subscribe()
    assert worker.pubsub is not None and worker.pubsub_thread is not None
    worker.pubsub.unsubscribe()
    wait_for(lambda: not worker.pubsub.subscribed, "the thread to read the unsubscribe reply", 10)
    stopping = threading.Thread(target=worker.unsubscribe, daemon=True)
    stopping.start()
    stopping.join(STOP_BOUND_S)
    assert not stopping.is_alive(), "the worker's teardown still waits on its pub/sub thread"
    assert not worker.pubsub_thread.is_alive()
