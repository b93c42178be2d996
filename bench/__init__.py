"""Benchmarks: ``python -m bench NAME [--quick] [--json]`` (run from the repository root).

- ``python -m bench --help`` lists the registered benchmarks.
- ``python -m bench NAME`` runs one, prints progress and a summary, and saves
  ``bench/results/NAME.json`` (gitignored). With ``--json`` the last line of output is the
  result as one JSON object with the keys ``name, metric, value, baseline, ratio, goal, unit``
  and ``extra`` (``met``, ``spread``, p50/p99, repetitions, the command…). The exit status is
  0 even when the goal is missed (``extra.met`` is false); non-zero only on errors.
- ``python -m bench all`` runs every benchmark and writes ``docs/benchmarks.md`` and the
  plots in ``docs/`` (``parallel_loops.png``, ``write_behind.png``); ``python -m bench
  report`` rewrites that page from the saved JSON files only. A ``--quick`` run never
  touches ``docs/``: its plots and (for ``all --quick``) its page go to ``bench/results/``.
- A benchmark may have options of its own (``python -m bench fault_recovery --fault
  trigger``): declared in the registry (:class:`bench.harness.Option`), passed to its ``run``
  as keyword arguments, refused for any other benchmark and for ``all`` (which runs each
  benchmark without them).

Benchmarks never touch shared data: Redis benchmarks start a private ``redis-server`` on a
unix socket (:func:`bench.harness.private_redis`); Postgres ones create a fresh database on
``$DATABASE_URL``'s server and drop it afterwards (:func:`bench.harness.fresh_database`).

Adding a benchmark (``flush_lag`` as the example):

1. Write ``bench/flush_lag.py`` with ``def run(quick: bool) -> Result``; build the result with
   :func:`bench.harness.make_result` (it computes ``ratio`` and ``extra["met"]``; pass
   ``goal_on="value"`` when the goal bounds the value rather than the ratio). Time competing
   arms with :func:`bench.harness.run_interleaved` and summarise with
   :func:`bench.harness.summarize`; put a one-line ``spread`` in ``extra``.
2. Register it in ``bench/__main__.py``::

       "flush_lag": Benchmark("bench.flush_lag", "age of the oldest dirty entry under load"),

3. Run ``python -m bench flush_lag --quick --json``; ``python -m bench all`` now includes it.
"""
