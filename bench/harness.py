"""Shared benchmark machinery: the result shape, statistics, timing, servers, machine facts.

Every benchmark returns one :class:`Result`. Its JSON form has exactly seven mandatory keys
(:data:`RESULT_KEYS`) plus ``extra`` for details; ``extra["met"]`` says whether the goal was
met and ``extra["spread"]`` is the one-line spread shown in ``docs/benchmarks.md``.

Timing compares like with like: :func:`run_interleaved` alternates the arms of a benchmark in
blocks, so CPU-frequency and idle-state drift on a small VM hits every arm equally. Absolute
microseconds on this machine move about 4x with the CPU's idle state; ratios barely move.
"""

from __future__ import annotations

import importlib
import math
import operator
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    pass

RESULT_KEYS = ("name", "metric", "value", "baseline", "ratio", "goal", "unit")
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/agent_sessions"

_GOAL = re.compile(r"^\s*(<=|>=|<|>)\s*([0-9]+(?:\.[0-9]+)?)\s*$")
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}


class HarnessError(RuntimeError):
    """A benchmark could not run (bad goal, missing server binary, unknown module…)."""


# --------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    """One benchmark outcome. ``ratio`` is ``value / baseline`` from the same run."""

    name: str
    metric: str
    value: float
    baseline: float | None
    ratio: float | None
    goal: str
    unit: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        met = self.extra.get("met")
        return met if isinstance(met, bool) else None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {key: getattr(self, key) for key in RESULT_KEYS}
        data["extra"] = self.extra
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Result:
        missing = [key for key in RESULT_KEYS if key not in data]
        if missing:
            raise HarnessError(f"result is missing keys {missing}")
        return cls(**{key: data[key] for key in RESULT_KEYS}, extra=dict(data.get("extra", {})))

    def with_extra(self, **values: Any) -> Result:
        return Result(
            **{key: getattr(self, key) for key in RESULT_KEYS}, extra={**self.extra, **values}
        )


def parse_goal(goal: str) -> tuple[str, float]:
    """``"<= 1.3"`` → ``("<=", 1.3)``."""
    match = _GOAL.match(goal)
    if match is None:
        raise HarnessError(f"goal must look like '<= 1.3' or '>= 5000', got {goal!r}")
    return match.group(1), float(match.group(2))


def goal_met(goal: str, observed: float | None) -> bool:
    if observed is None:
        return False
    op, threshold = parse_goal(goal)
    return _COMPARE[op](observed, threshold)


def make_result(
    name: str,
    metric: str,
    *,
    value: float,
    baseline: float | None,
    goal: str,
    unit: str,
    goal_on: str = "ratio",
    extra: Mapping[str, Any] | None = None,
) -> Result:
    """A result with ``ratio`` and ``extra["met"]`` computed; the goal applies to ``goal_on``."""
    if goal_on not in ("ratio", "value"):
        raise HarnessError(f"goal_on must be 'ratio' or 'value', got {goal_on!r}")
    rat = round(ratio(value, baseline), 3) if baseline is not None else None
    observed = rat if goal_on == "ratio" else value
    details = {"met": goal_met(goal, observed), "goal_on": goal_on, **(extra or {})}
    return Result(name, metric, value, baseline, rat, goal, unit, details)


# --------------------------------------------------------------------------------- statistics


def median(samples: Sequence[float]) -> float:
    if not samples:
        raise HarnessError("median of no samples")
    return float(statistics.median(samples))


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least ``q`` % of samples <= it."""
    if not samples:
        raise HarnessError("percentile of no samples")
    if not 0 < q <= 100:
        raise HarnessError(f"percentile must be in (0, 100], got {q}")
    ordered = sorted(samples)
    return float(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)])


def ratio(value: float, baseline: float) -> float:
    if baseline <= 0:
        raise HarnessError(f"baseline must be positive, got {baseline}")
    return value / baseline


@dataclass(frozen=True)
class Summary:
    """Median, p99 and count of samples, in the samples' unit."""

    median: float
    p99: float
    count: int


def summarize(samples: Sequence[float]) -> Summary:
    return Summary(median(samples), percentile(samples, 99), len(samples))


def ns_to_us(samples: Sequence[int]) -> list[float]:
    return [sample / 1000 for sample in samples]


# --------------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], object], count: int) -> list[int]:
    """Wall time of ``count`` sequential calls of ``fn``, in nanoseconds each."""
    clock = time.perf_counter_ns
    samples = [0] * count
    for i in range(count):
        start = clock()
        fn()
        samples[i] = clock() - start
    return samples


BlockHook = Callable[[int, Mapping[str, list[int]]], None]


def run_interleaved(
    arms: Mapping[str, Callable[[], object]],
    *,
    blocks: int,
    per_block: int,
    warmup: int = 0,
    on_block: BlockHook | None = None,
) -> dict[str, list[list[int]]]:
    """Time every arm in ``blocks`` alternating blocks; ``{arm: [block samples (ns)]}``.

    Block order alternates (A B, B A, A B, …) so neither arm always runs second. ``warmup``
    calls of each arm run first and are discarded. ``on_block(i, {arm: samples})`` reports
    progress after each block.
    """
    names = list(arms)
    for name in names:
        time_calls(arms[name], warmup)
    out: dict[str, list[list[int]]] = {name: [] for name in names}
    for index in range(blocks):
        order = names if index % 2 == 0 else names[::-1]
        block = {name: time_calls(arms[name], per_block) for name in order}
        for name in names:
            out[name].append(block[name])
        if on_block is not None:
            on_block(index, block)
    return out


# --------------------------------------------------------------------------------- registry

RunFn = Callable[..., Result]
"""A benchmark's ``run(quick: bool, **options: str) -> Result``."""


@dataclass(frozen=True)
class Option:
    """A command-line option of one benchmark (``--fault trigger``): when given, its value
    reaches that benchmark's ``run`` as a keyword argument (``fault="trigger"``)."""

    flag: str
    help: str
    choices: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: the module holding ``run(quick: bool, **options) -> Result``,
    where ``options`` are the :class:`Option` values given on the command line."""

    module: str
    description: str
    options: tuple[Option, ...] = ()

    def load(self) -> RunFn:
        run = getattr(importlib.import_module(self.module), "run", None)
        if not callable(run):
            raise HarnessError(f"{self.module} has no run(quick: bool, **options) -> Result")
        return cast(RunFn, run)


# --------------------------------------------------------------------------------- servers


@contextmanager
def private_redis() -> Iterator[str]:
    """A private ``redis-server`` (unix socket, no persistence) for one run; yields its URL."""
    from tests.servers import RedisServer  # the project's test servers; no pytest needed

    with RedisServer() as server:
        yield server.url


def database_url() -> str:
    return os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


@contextmanager
def fresh_database(prefix: str = "asc_bench_") -> Iterator[str]:
    """A new database on ``$DATABASE_URL``'s server, dropped on exit; yields its psycopg URL."""
    from tests.servers import fresh_database as _fresh

    with _fresh(database_url(), prefix=prefix) as database:
        yield database.url


# --------------------------------------------------------------------------------- machine


def _first_line_with(path: str, prefix: str) -> str | None:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(prefix)), None)


def _command_output(argv: Sequence[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    return done.stdout.strip() or None


def redis_server_version() -> str:
    out = _command_output(["redis-server", "--version"]) or ""
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else "not found"


def postgres_version(url: str | None = None) -> str:
    """The version of ``$DATABASE_URL``'s server, or why it could not be read."""
    import psycopg

    from tests.servers import with_database

    try:
        server = with_database(url or database_url(), "postgres")
        with psycopg.connect(server, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error as exc:
        return f"not reachable ({type(exc).__name__})"
    return str(row[0]) if row else "unknown"


def _memory() -> str:
    total = _first_line_with("/proc/meminfo", "MemTotal")
    return f"{int(total.split()[0]) / 1024 / 1024:.1f} GiB" if total else "unknown"


def machine_facts(*, with_postgres: bool = True) -> dict[str, str]:
    """What a reader needs to judge the numbers: CPU, memory, OS, interpreter, servers."""
    import hiredis
    import redis

    facts = {
        "nproc": str(os.cpu_count() or 0),
        "cpu": _first_line_with("/proc/cpuinfo", "model name") or platform.processor(),
        "memory": _memory(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "redis_server": redis_server_version(),
        "redis_py": f"{redis.__version__} (hiredis {hiredis.__version__})",
    }
    if with_postgres:
        facts["postgres"] = postgres_version()
        facts["postgres_settings"] = postgres_settings()
    facts["loadavg_1m_now"] = f"{os.getloadavg()[0]:.2f}"
    return facts


def postgres_settings(url: str | None = None) -> str:
    """The durability settings of ``$DATABASE_URL``'s server (what a commit costs)."""
    import psycopg

    from tests.servers import with_database

    names = ("fsync", "synchronous_commit", "wal_sync_method", "shared_buffers")
    try:
        server = with_database(url or database_url(), "postgres")
        with psycopg.connect(server, connect_timeout=3) as conn:
            values = [conn.execute(f"SHOW {name}").fetchone() for name in names]
    except psycopg.Error as exc:
        return f"not reachable ({type(exc).__name__})"
    shown = ", ".join(f"{n}={v[0] if v else '?'}" for n, v in zip(names, values, strict=True))
    return f"{shown} (the shared server of $DATABASE_URL; a fresh database per benchmark)"


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Move everything allocated so far out of the cyclic GC's sight for the duration.

    A benchmark that prepares a large baseline data set up front (a million objects) would
    otherwise make every collection during the arm under test rescan that data, a cost no
    real worker process pays.
    """
    import gc

    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def cpu_warm() -> Iterator[None]:
    """A one-core busy-loop process for the duration: keeps the vCPUs out of their idle
    states (the baselines' "CPU-warm" rows), so wake-up latency stops dominating round trips."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "while True: pass"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def run_interleaved_warm(
    arms: Mapping[str, Callable[[], object]],
    *,
    blocks: int,
    per_block: int,
    warmup: int = 0,
    on_block: BlockHook | None = None,
) -> dict[str, list[list[int]]]:
    """:func:`run_interleaved` inside :func:`cpu_warm`: the benchmarks' CPU-warm pass."""
    print("  again with a busy-loop process (CPU-warm):", flush=True)
    with cpu_warm():
        return run_interleaved(
            arms, blocks=blocks, per_block=per_block, warmup=warmup, on_block=on_block
        )


def spread_text(values: Sequence[float], unit: str = "", digits: int = 2) -> str:
    """``"min-max over N reps"``, the one-line spread of repeated measurements."""
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:.{digits}f}-{high:.{digits}f}{unit} over {len(values)} reps"


# ------------------------------------------------------------ ours vs the original, per block

Blocks = Mapping[str, Sequence[Sequence[int]]]
"""Interleaved samples (ns) per arm, block by block (what :func:`run_interleaved` returns)."""


def arm_p50_us(samples: Blocks, arm: str) -> float:
    """The median of every sample of ``arm``, in µs."""
    return median(ns_to_us([s for block in samples[arm] for s in block]))


def block_ratios(samples: Blocks, arm: str = "ours", baseline: str = "original") -> list[float]:
    """Per block, ``arm``'s median over ``baseline``'s."""
    pairs = zip(samples[arm], samples[baseline], strict=True)
    return [round(ratio(median(a), median(b)), 3) for a, b in pairs]


def ours_vs_original_progress(blocks: int) -> Callable[[int, Mapping[str, list[int]]], None]:
    """An ``on_block`` printer of the ``ours`` and ``original`` medians and their ratio."""

    def report(index: int, block: Mapping[str, list[int]]) -> None:
        ours, original = median(block["ours"]) / 1000, median(block["original"]) / 1000
        print(
            f"  block {index + 1:>2}/{blocks}: ours {ours:7.1f} us  original "
            f"{original:7.1f} us  ratio {ours / original:.3f}",
            flush=True,
        )

    return report


def ours_vs_original_facts(samples: Blocks) -> tuple[Summary, Summary, dict[str, Any]]:
    """Summaries of ``ours`` and ``original`` (µs) and the ``extra`` facts both loop-shaped
    benchmarks report: spread, p50/p99, speedup, block ratios, and the ``raw`` floor."""
    ours = summarize(ns_to_us([s for block in samples["ours"] for s in block]))
    original = summarize(ns_to_us([s for block in samples["original"] for s in block]))
    raw = arm_p50_us(samples, "raw")
    blocks = block_ratios(samples)
    facts = {
        "spread": f"block ratios {min(blocks):.3f}-{max(blocks):.3f} over {len(blocks)} blocks",
        "ours_p50_us": round(ours.median, 1),
        "ours_p99_us": round(ours.p99, 1),
        "original_p50_us": round(original.median, 1),
        "original_p99_us": round(original.p99, 1),
        "speedup": round(original.median / ours.median, 1),
        "raw_p50_us": round(raw, 1),
        "floor_ratio": round(raw / original.median, 3),
        "ours_vs_raw": round(ours.median / raw, 3),
        "block_ratios": blocks,
    }
    return ours, original, facts
