"""Saved results (``bench/results/<name>.json``) and the page made of them, ``docs/benchmarks.md``.

Every run of a benchmark overwrites its own JSON file (the directory is gitignored), so the
page always shows the last result of each benchmark together with the command and time that
produced it. A result run with a non-default option that its benchmark names as a variant
(``extra["variant"]``, e.g. ``--snapshot small``) has a file of its own
(``hot_path--snapshot=small.json``) and a row of its own, beside the default one.
``python -m bench report`` rebuilds the page from those files alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import Result

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUN_INFO = "_all_run.meta"  # the last ``bench all``: wall time and command (not a result)
DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
_UNITS = {"us": "µs"}
_COLUMNS = ("benchmark", "metric", "value", "baseline", "ratio", "goal", "met?", "spread")

HOW_TO_READ = """\
## How to read the numbers

- **ratio = value / baseline**, both measured in the same run against the same private server,
  interleaved in alternating blocks, so machine drift hits both sides equally. The goal is a
  bound on the ratio unless it says `value`.
- Absolute microseconds on this VM swing about 4x with the CPU's idle state: a Redis round trip
  is ~110 µs when the 2 vCPUs idle between calls and ~25 µs when they are kept busy (the
  `cpu_warm_*` extras measure that state). Compare ratios across runs and machines, not
  microseconds. Ratios move with it too: both arms pay the wake-ups (in wall time, and in
  the CPU of the side that wakes the other), which pulls a ratio towards 1; the
  `cpu_warm_*` ratios of `hot_path`, `loop_vs_postgres` and `cpu_per_iteration` are closer
  to the arms' own work.
- **spread** is the range of the per-block ratios (and p99s): a wide range means a noisy run;
  rerun without `--quick` before drawing conclusions.
- `--quick` runs take seconds and are for smoke tests; publish full runs.
- The write-behind benchmarks (`coalescing`, `flush_*`, `loop_vs_postgres`, `parallel_loops`,
  `cleanup`) run real `agent-sessions worker` processes and use a fresh database on the
  shared Postgres server (`$DATABASE_URL`, fsync on), which other work on this 2-vCPU machine
  also uses: their absolute numbers move with it, and the loop processes, the RQ workers,
  Redis and Postgres all share the same two vCPUs. Redis is always a private server.
- A goal on `value` (rather than the ratio) is marked `value` in the goal column; `baseline`
  is then the reference the value is read against (e.g. `flush_delay` for `flush_lag`).
- The loop benchmarks save a realistic agent state by default (`bench/agent_state.py`: six
  layers, ~8 KB and ~180 containers, a new state every iteration); a row named
  `NAME --snapshot small` is the same benchmark with the small four-layer snapshot the
  benchmarks saved before (`python -m bench NAME --snapshot small`). `extra.snapshot` names
  the state every result used.
- `cpu_per_iteration` and `flush_cpu` count CPU, not time: this process's
  (`time.process_time`), the private Redis server's (`INFO cpu`) and the worker pool's
  (`/proc`, summed over its process group). CPU moves less than wall time with the vCPUs'
  idle states, but the machine's other work still slows every arm's caches and clocks.
"""


def result_key(result: Result) -> str:
    """How a result is listed: its benchmark's name, then its variant if it has one
    (``hot_path --snapshot small``)."""
    variant = result.extra.get("variant")
    return f"{result.name} {variant}" if variant else result.name


def result_file(result: Result) -> str:
    """``hot_path.json``; a variant's ``hot_path--snapshot=small.json``."""
    variant = str(result.extra.get("variant") or "")
    return result.name + variant.replace(" --", "--").replace(" ", "=") + ".json"


def save_result(result: Result, results_dir: Path = RESULTS_DIR) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / result_file(result)
    path.write_text(json.dumps(result.to_dict(), indent=2, sort_keys=False) + "\n")
    return path


def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, Result]:
    """Every saved result, by :func:`result_key`."""
    if not results_dir.is_dir():
        return {}
    paths = sorted(results_dir.glob("*.json"))
    loaded = (Result.from_dict(json.loads(p.read_text())) for p in paths)
    return {result_key(result): result for result in loaded}


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    else:
        text = f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{text} {_UNITS.get(unit, unit)}".strip()


def _ratio(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _met(result: Result) -> str:
    return {True: "yes", False: "**no**", None: "?"}[result.met]


def _goal(result: Result) -> str:
    on = result.extra.get("goal_on", "ratio")
    unit = "" if on == "ratio" else f" {_UNITS.get(result.unit, result.unit)}"
    return f"{on} {result.goal}{unit}"


def _row(result: Result) -> str:
    ratio = "-" if result.ratio is None else _ratio(result.ratio)
    command = result.extra.get("command", "?")
    cells = [
        f"`{result_key(result)}`",
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


def _also_rows(result: Result) -> list[str]:
    """Secondary measurements a benchmark reports (``extra["also"]``), one row each."""
    rows = []
    for item in result.extra.get("also", []):
        unit = str(item.get("unit", ""))
        value, baseline = item.get("value"), item.get("baseline")
        rat = _ratio(value / baseline) if value is not None and baseline else "-"
        goal = f"value {item['goal']} {_UNITS.get(unit, unit)}" if "goal" in item else "-"
        met = {True: "yes", False: "**no**"}.get(item.get("met"), "-")
        cells = [
            f"`{result_key(result)}` (also)",
            item.get("metric", "?"),
            _number(value, unit),
            _number(baseline, unit),
            rat,
            goal,
            met,
            item.get("note", "-"),
            "same run",
        ]
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return rows


def results_table(results: Iterable[Result]) -> list[str]:
    header = [*_COLUMNS, "command (when)"]
    rows = []
    for result in results:
        rows += [_row(result), *_also_rows(result)]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows]


def plots(results: Iterable[Result]) -> list[str]:
    """Image links for the results that drew a plot (``extra["plot"]``, a file in docs/)."""
    lines = []
    for result in results:
        name = result.extra.get("plot")
        if name:
            lines += [f"### `{result.name}`", "", f"![{result.name}]({name})", ""]
    return ["## Plots", "", *lines] if lines else []


def save_run_info(info: Mapping[str, str], results_dir: Path = RESULTS_DIR) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / RUN_INFO).write_text(json.dumps(dict(info)) + "\n")


def load_run_info(results_dir: Path = RESULTS_DIR) -> dict[str, str]:
    path = results_dir / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def _run_section(results: Sequence[Result], info: Mapping[str, str]) -> list[str]:
    if not info:
        return []
    seconds = ", ".join(
        f"`{r.name}` {r.extra['seconds']:.0f} s" for r in results if "seconds" in r.extra
    )
    return [
        "## Last full run",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        f"- per benchmark: {seconds}",
        "",
    ]


def _details(result: Result) -> list[str]:
    skip = {"spread", "command", "recorded_at", "met", "goal_on", "what", "also", "plot", "variant"}
    lines = [f"### `{result_key(result)}`", ""]
    if "what" in result.extra:
        lines += [f"What is measured: {result.extra['what']}.", ""]
    if result.extra.get("plot"):
        lines += [f"Plot: [{result.extra['plot']}]({result.extra['plot']})", ""]
    lines += [f"- {key}: `{value}`" for key, value in result.extra.items() if key not in skip]
    return [*lines, ""]


def render(
    results: Sequence[Result],
    machine: Mapping[str, str],
    *,
    missing: Sequence[str] = (),
    run_info: Mapping[str, str] | None = None,
) -> str:
    """The whole of ``docs/benchmarks.md``."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        f"Generated {now} by `python -m bench` from the last saved result of each benchmark",
        "(`bench/results/<name>.json`, gitignored). `python -m bench all` reruns them all and",
        "rewrites this page; `python -m bench report` rewrites it from the saved files.",
        "",
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in machine.items()),
        "",
        *_run_section(results, run_info or {}),
        "## Results",
        "",
        "value = the median over the repetitions (or blocks) of one run; spread = their range.",
        "Rows marked (also) are secondary measurements of the benchmark above them.",
        "",
        *results_table(results),
        "",
    ]
    if missing:
        names = ", ".join(f"`{name}`" for name in missing)
        lines += [f"No saved result for: {names} (run `python -m bench NAME`).", ""]
    lines += [*plots(results), HOW_TO_READ, "## Details", ""]
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
    """Write the page from the saved results, registered benchmarks first, in ``order``, each
    followed by its variants."""
    saved = load_results(results_dir)
    rank = {name: i for i, name in enumerate(order)}
    names = sorted(saved, key=lambda key: (rank.get(saved[key].name, len(rank)), key))
    missing = [name for name in order if name not in saved]
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    page = render(
        [saved[name] for name in names],
        machine,
        missing=missing,
        run_info=load_run_info(results_dir),
    )
    doc_path.write_text(page)
    return doc_path


def stamp(result: Result, command: str, **more: Any) -> Result:
    """The result with the command that produced it and the time it finished."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return result.with_extra(command=command, recorded_at=when, **more)
