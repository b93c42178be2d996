"""Saved results (``bench/results/<name>.json``) and the page made of them, ``docs/benchmarks.md``.

Every run of a benchmark overwrites its own JSON file (the directory is gitignored), so the
page always shows the last result of each benchmark together with the command and time that
produced it. ``python -m bench report`` rebuilds the page from those files alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import Result

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
_UNITS = {"us": "µs"}
_COLUMNS = ("benchmark", "metric", "value", "baseline", "ratio", "goal", "met?", "spread")

HOW_TO_READ = """\
## How to read the numbers

- **ratio = value / baseline**, both measured in the same run against the same private server,
  interleaved in alternating blocks, so machine drift hits both sides equally. The goal is a
  bound on the ratio unless it says `value`.
- Absolute microseconds on this VM swing about 4x with the CPU's idle state: a Redis round trip
  is ~110 µs when the 2 vCPUs idle between calls and ~25 µs when they are kept busy
  (`/work/shared/reference/baselines.md`, "idle-vCPU caveat"). Compare ratios across runs and
  machines, not microseconds.
- **spread** is the range of the per-block ratios (and p99s): a wide range means a noisy run;
  rerun without `--quick` before drawing conclusions.
- `--quick` runs take seconds and are for smoke tests; publish full runs.
"""


def save_result(result: Result, results_dir: Path = RESULTS_DIR) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result.name}.json"
    path.write_text(json.dumps(result.to_dict(), indent=2, sort_keys=False) + "\n")
    return path


def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, Result]:
    """Every saved result, by benchmark name."""
    if not results_dir.is_dir():
        return {}
    loaded = (Result.from_dict(json.loads(p.read_text())) for p in results_dir.glob("*.json"))
    return {result.name: result for result in loaded}


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.1f}"
    return f"{text} {_UNITS.get(unit, unit)}".strip()


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _met(result: Result) -> str:
    return {True: "yes", False: "**no**", None: "?"}[result.met]


def _goal(result: Result) -> str:
    on = result.extra.get("goal_on", "ratio")
    unit = "" if on == "ratio" else f" {_UNITS.get(result.unit, result.unit)}"
    return f"{on} {result.goal}{unit}"


def _row(result: Result) -> str:
    ratio = "-" if result.ratio is None else f"{result.ratio:.2f}"
    command = result.extra.get("command", "?")
    cells = [
        f"`{result.name}`",
        result.metric,
        _number(result.value, result.unit),
        _number(result.baseline, result.unit),
        ratio,
        _goal(result),
        _met(result),
        result.extra.get("spread", "-"),
        f"`{command}` ({result.extra.get('recorded_at', '?')})",
    ]
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def results_table(results: Iterable[Result]) -> list[str]:
    header = [*_COLUMNS, "command (when)"]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *(_row(result) for result in results),
    ]


def _details(result: Result) -> list[str]:
    skip = {"spread", "command", "recorded_at", "met", "goal_on"}
    lines = [f"### `{result.name}`", ""]
    lines += [f"- {key}: `{value}`" for key, value in result.extra.items() if key not in skip]
    return [*lines, ""]


def render(
    results: Sequence[Result], machine: Mapping[str, str], *, missing: Sequence[str] = ()
) -> str:
    """The whole of ``docs/benchmarks.md``."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        f"Generated {now} by `python -m bench` from the last saved result of each benchmark",
        "(`bench/results/<name>.json`, gitignored). `python -m bench all [--quick]` reruns them",
        "all and rewrites this page; `python -m bench report` rewrites it from the saved files.",
        "",
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in machine.items()),
        "",
        "## Results",
        "",
        *results_table(results),
        "",
    ]
    if missing:
        names = ", ".join(f"`{name}`" for name in missing)
        lines += [f"No saved result for: {names} (run `python -m bench NAME`).", ""]
    lines += [HOW_TO_READ, "## Details", ""]
    for result in results:
        lines += _details(result)
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    order: Sequence[str],
    machine: Mapping[str, str],
    *,
    results_dir: Path = RESULTS_DIR,
    doc_path: Path = DOC_PATH,
) -> Path:
    """Write the page from the saved results, registered benchmarks first, in ``order``."""
    saved = load_results(results_dir)
    names = [name for name in order if name in saved] + sorted(set(saved) - set(order))
    missing = [name for name in order if name not in saved]
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(render([saved[name] for name in names], machine, missing=missing))
    return doc_path


def stamp(result: Result, command: str, **more: Any) -> Result:
    """The result with the command that produced it and the time it finished."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return result.with_extra(command=command, recorded_at=when, **more)
