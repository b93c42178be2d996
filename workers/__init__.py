"""RQ workers and what drives them, below ``agent_sessions``; one module per job:

* ``context``: what a worker process needs (``WorkerContext``, built once per process).
* ``flush_policy``: which outcome flushes how, delays, batch, pending TTLs, urgent requests.
* ``queues``: the flush and cleanup queues and their one-job-per-shard/per-session markers;
  ``jobs``: the job functions RQ runs; ``door``: the checks a job passes before it runs.
* ``flush``: one shard's flush (its lock, the fenced upsert, the acknowledgement);
  ``drain``: flush everything now; ``readthrough``: loads and saves that fall back to Postgres.
* ``trigger``: the flush trigger; ``reconcile``: ended owners, idle conversations, lost keys.
* ``cleanup``: a ``cleaning`` session's backend cleanup and its lease.
* ``supervisor``, ``pool``, ``preflight``, ``heartbeat``, ``metrics_server``: the supervised
  pool, its start-up checks, renewed leases and the Prometheus endpoint.
"""
