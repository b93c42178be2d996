"""PNG plots of benchmark curves for ``docs/`` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"


def plot_parallel_loops(points: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Iterations/s against N processes for both arms (log-log), the ratio on each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(p["n"]) for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(sizes, [p["ours"] for p in points], "o-", label="ours (Redis + write-behind)")
    ax.plot(sizes, [p["original"] for p in points], "s-", label="original (Postgres only, ORM)")
    for p in points:
        ax.annotate(
            f"{p['ratio']:.1f}x",
            (p["n"], p["ours"]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("loop processes (N), 2 vCPUs")
    ax.set_ylabel("total loop iterations/s")
    ax.set_title("parallel_loops: enter+finish (8 KB snapshot) per iteration")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
