"""PNG plots of benchmark curves (matplotlib, Agg backend: no display needed).

A full run draws into ``docs/`` (the pictures the README and docs/benchmarks.md show); a
``--quick`` run draws into ``bench/results/`` so that it never rewrites a tracked picture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.harness import percentile
from bench.report import RESULTS_DIR

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"
ARM_STYLE = {
    "ours": ("o-", "tab:blue", "ours (Redis + write-behind)"),
    "raw": ("^--", "tab:orange", "raw redis-py (HGETALL + EVALSHA)"),
    "original": ("s-", "tab:green", "original (Postgres only, ORM)"),
}


def plot_path(name: str, quick: bool) -> Path:
    """Where a plot goes: ``docs/NAME`` for a full run, ``bench/results/NAME`` for a quick one."""
    return (RESULTS_DIR if quick else DOCS_DIR) / name


def _figure(rows: int = 1, height: float = 4.4) -> tuple[Figure, list[Axes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 1, figsize=(7.6, height), dpi=110, squeeze=False)
    return fig, [row[0] for row in axes]


def _save(fig: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ parallel_loops


def _arm_curve(ax: Axes, arm: str, sizes: Sequence[int], points: Any, reps: Any) -> None:
    style, color, label = ARM_STYLE[arm]
    ax.plot(sizes, [p[arm] for p in points], style, color=color, label=label)
    low = [min(reps[arm][n]) for n in sizes]
    high = [max(reps[arm][n]) for n in sizes]
    ax.fill_between(sizes, low, high, color=color, alpha=0.15, linewidth=0)


def plot_parallel_loops(
    points: Sequence[Mapping[str, float]],
    reps: Mapping[str, Mapping[int, Sequence[float]]],
    goal: float,
    path: Path,
) -> Path:
    """Total iterations/s against N processes per arm (log-log), the spread of the
    repetitions as a band, the goal (``goal`` x raw) as a dotted line, ours / raw labelled."""
    sizes = [int(p["n"]) for p in points]
    fig, (ax,) = _figure()
    for arm in ARM_STYLE:
        _arm_curve(ax, arm, sizes, points, reps)
    ax.plot(
        sizes,
        [goal * p["raw"] for p in points],
        ":",
        color="tab:red",
        label=f"goal: ours >= {goal:g} x raw",
    )
    for p in points:
        ax.annotate(
            f"{p['ratio']:.2f}x raw",
            (p["n"], p["ours"]),
            textcoords="offset points",
            xytext=(0, -15),
            ha="center",
            fontsize=8,
            color="tab:blue",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.margins(x=0.08, y=0.12)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("loop processes (N) on 2 vCPUs")
    ax.set_ylabel("total loop iterations/s (all N processes)")
    ax.set_title(
        "parallel_loops: iterations/s of enter + finish with an 8 KB agent state\n"
        "(median of the repetitions; band: slowest to fastest)",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------- flush_lag


def per_second(times: Sequence[float], start: float) -> tuple[list[float], list[int]]:
    """Counts of ``times`` in each whole second from ``start``: (second, count) columns."""
    if not times:
        return [], []
    counts = [0] * (int(max(times) - start) + 1)
    for t in times:
        if t >= start:
            counts[int(t - start)] += 1
    return [float(s) for s in range(len(counts))], counts


def _timeline(ax: Axes, saves: Sequence[float], writes: Sequence[float], start: float) -> None:
    for times, label, color in (
        (saves, "saves acknowledged by Redis", "tab:blue"),
        (writes, "rows written to Postgres", "tab:green"),
    ):
        seconds, counts = per_second(times, start)
        ax.step(seconds, counts, where="post", color=color, label=f"{label} ({len(times):,})")
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("per second")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower center", fontsize=8)


def _lag_histogram(ax: Axes, lags: Sequence[float], delay_s: float, p99: float) -> None:
    ax.hist(lags, bins=60, color="tab:green", alpha=0.8)
    for x, style, label in (
        (delay_s, "--", f"flush delay {delay_s:g} s"),
        (p99, "-", f"p99 {p99:.2f} s"),
        (delay_s + 1, ":", f"goal: p99 <= {delay_s + 1:g} s"),
    ):
        ax.axvline(x, linestyle=style, color="black" if style != ":" else "tab:red", label=label)
    ax.set_xlabel("lag of each Postgres write: its oldest change's age when written (s)")
    ax.set_ylabel("writes")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)


def plot_write_behind(
    saves: Sequence[float],
    writes: Sequence[float],
    lags: Sequence[float],
    delay_s: float,
    path: Path,
) -> Path:
    """What write-behind buys: saves vs Postgres writes per second (the coalescing) over
    the load, and how long each write's oldest change waited (the lag)."""
    start, p99 = min(saves), percentile(lags, 99)
    fig, (top, bottom) = _figure(rows=2, height=7.2)
    _timeline(top, saves, writes, start)
    top.set_title(
        f"write-behind (flush_lag): {len(saves) / max(len(writes), 1):.1f} saves per Postgres "
        f"write; every change in Postgres within {max(lags):.2f} s",
        fontsize=10,
    )
    _lag_histogram(bottom, lags, delay_s, p99)
    return _save(fig, path)
