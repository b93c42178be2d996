"""``python -m bench NAME [--quick] [--json] [options of NAME]`` | ``all [--quick]`` | ``report``.

The registry below is the only list of benchmarks: add a line to :data:`BENCHMARKS` to plug
one in (see the package docstring). A benchmark may declare options of its own
(:class:`bench.harness.Option`, e.g. ``fault_recovery --fault trigger``); they reach its
``run`` as keyword arguments, are refused for any other benchmark (and for ``all``), and a
benchmark run without them does what ``all`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.harness import Benchmark, Option, Result, machine_facts
from bench.report import DOC_PATH, RESULTS_DIR, save_result, save_run_info, stamp, write_report

FAULT = Option(
    "--fault",
    "run one fault case alone (default: all four)",
    choices=("worker", "trigger", "cleanup", "group-term"),
)
SNAPSHOT = Option(
    "--snapshot",
    "the agent state saved each iteration: realistic (default; bench/agent_state.py) or "
    "small (the four-layer snapshot of before); a small run is saved as a variant",
    choices=("realistic", "small"),
)
BENCHMARKS: dict[str, Benchmark] = {
    "hot_path": Benchmark(
        "bench.hot_path", "load+save of an 8 KB agent state vs raw redis-py", options=(SNAPSHOT,)
    ),
    "coalescing": Benchmark("bench.coalescing", "Postgres row writes per save in a hot loop"),
    "flush_throughput": Benchmark(
        "bench.flush_throughput", "rows/s flushed end to end vs raw psycopg unnest"
    ),
    "flush_lag": Benchmark("bench.flush_lag", "p99 time from first dirty to written in Postgres"),
    "fault_recovery": Benchmark(
        "bench.fault_recovery",
        "SIGKILLed workers, trigger, cleanup; SIGTERMed pool: worst time vs its bound",
        options=(FAULT,),
    ),
    "loop_vs_postgres": Benchmark(
        "bench.loop_vs_postgres",
        "loop iteration: ours vs the Postgres-only original",
        options=(SNAPSHOT,),
    ),
    "conversation_turns": Benchmark(
        "bench.conversation_turns",
        "chat turn: ours vs the Postgres-only original's app store",
        options=(SNAPSHOT,),
    ),
    "parallel_loops": Benchmark(
        "bench.parallel_loops",
        "iterations/s with N loop processes, ours vs raw redis-py (and the original)",
        options=(SNAPSHOT,),
    ),
    "cpu_per_iteration": Benchmark(
        "bench.cpu_per_iteration",
        "CPU per loop iteration (client + Redis server), ours vs raw redis-py",
        options=(SNAPSHOT,),
    ),
    "flush_cpu": Benchmark(
        "bench.flush_cpu",
        "worker pool CPU per flushed row under loop load; Redis CPU of an idle pool",
        options=(SNAPSHOT,),
    ),
    "scale": Benchmark(
        "bench.scale", "iteration time and memory with 100k live sessions", options=(SNAPSHOT,)
    ),
    "cleanup": Benchmark("bench.cleanup", "workflow end: unresumable and cleaned, 100 sessions"),
}
COMMANDS = {
    "all": "run every benchmark, then write docs/benchmarks.md",
    "report": "rewrite docs/benchmarks.md from the saved results (bench/results/*.json)",
}


def build_parser(registry: Mapping[str, Benchmark]) -> argparse.ArgumentParser:
    listing = [f"  {name:<18} {b.description}" for name, b in registry.items()]
    listing += [f"  {name:<18} {text}" for name, text in COMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run a benchmark; every run saves bench/results/NAME.json.",
        epilog="benchmarks:\n" + "\n".join(listing),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=[*registry, *COMMANDS], metavar="NAME")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short smoke run (seconds); never writes docs/ (plots and page: bench/results/)",
    )
    parser.add_argument("--json", action="store_true", help="last line: the result as JSON")
    options = benchmark_options(registry)
    if options:
        group = parser.add_argument_group("options of one benchmark")
        for option, owners in options.values():
            group.add_argument(
                option.flag,
                choices=option.choices or None,
                default=None,
                help=f"{', '.join(owners)}: {option.help}",
            )
    return parser


def benchmark_options(registry: Mapping[str, Benchmark]) -> dict[str, tuple[Option, list[str]]]:
    """Every benchmark option by flag, with the benchmarks that have it."""
    found: dict[str, tuple[Option, list[str]]] = {}
    for name, benchmark in registry.items():
        for option in benchmark.options:
            found.setdefault(option.flag, (option, []))[1].append(name)
    return found


def chosen_options(
    parser: argparse.ArgumentParser, registry: Mapping[str, Benchmark], args: argparse.Namespace
) -> dict[str, str]:
    """The benchmark options given, as ``run`` keywords; an option the named benchmark does
    not have is a usage error (exit status 2)."""
    chosen = {}
    for option, owners in benchmark_options(registry).values():
        value = getattr(args, option.dest)
        if value is None:
            continue
        if args.name not in owners:
            parser.error(f"{option.flag} is an option of {', '.join(owners)}, not of {args.name}")
        chosen[option.dest] = str(value)
    return chosen


def summary_line(result: Result) -> str:
    met = {True: "met", False: "MISSED", None: "?"}[result.met]
    baseline = "" if result.baseline is None else f" vs baseline {result.baseline} {result.unit}"
    ratio = "" if result.ratio is None else f", ratio {result.ratio:.2f}"
    return (
        f"{result.name}: {result.value} {result.unit}{baseline}{ratio} "
        f"(goal {result.goal}: {met}; {result.extra.get('spread', '')})"
    )


def run_one(
    name: str,
    benchmark: Benchmark,
    *,
    quick: bool,
    as_json: bool,
    command: str,
    results_dir: Path,
    options: Mapping[str, str] | None = None,
) -> Result:
    """Run one benchmark, save its result, print the summary (and the JSON line last)."""
    given = "".join(f" --{key.replace('_', '-')} {value}" for key, value in (options or {}).items())
    print(f"== {name}{' (quick)' if quick else ''}{given}: {benchmark.description}", flush=True)
    started = time.monotonic()
    result = benchmark.load()(quick, **(options or {}))
    seconds = round(time.monotonic() - started, 1)
    load = round(os.getloadavg()[0], 2)
    result = stamp(result, command, quick=quick, seconds=seconds, loadavg_1m=load)
    save_result(result, results_dir)
    print(summary_line(result), flush=True)
    if as_json:
        print(json.dumps(result.to_dict()), flush=True)
    return result


def run_all(
    registry: Mapping[str, Benchmark], args: argparse.Namespace, command: str, results_dir: Path
) -> int:
    """Every benchmark in turn; one failing does not stop the rest, but fails the command."""
    failed = []
    started = time.monotonic()
    for name, benchmark in registry.items():
        try:
            run_one(
                name,
                benchmark,
                quick=args.quick,
                as_json=args.json,
                command=command,
                results_dir=results_dir,
            )
        except Exception:
            traceback.print_exc()
            (results_dir / f"{name}.json").unlink(missing_ok=True)  # never report stale numbers
            failed.append(name)
    wall = time.monotonic() - started
    print(f"all: {len(registry)} benchmarks in {wall:.0f} s", flush=True)
    info = {
        "command": f"`{command}`",
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall time": f"{wall:.0f} s ({wall / 60:.1f} min) for {len(registry)} benchmarks",
        "load average (1 min) at the end": f"{os.getloadavg()[0]:.2f}",
    }
    if failed:
        info["failed"] = ", ".join(failed)
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    save_run_info(info, results_dir)
    return 1 if failed else 0


def main(
    argv: Sequence[str] | None = None,
    *,
    registry: Mapping[str, Benchmark] = BENCHMARKS,
    results_dir: Path = RESULTS_DIR,
    doc_path: Path = DOC_PATH,
) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(registry)
    args = parser.parse_args(argv)
    options = chosen_options(parser, registry, args)
    command = " ".join(["python -m bench", *argv])
    status = 0
    if args.name == "all":
        status = run_all(registry, args, command, results_dir)
    elif args.name != "report":
        run_one(
            args.name,
            registry[args.name],
            quick=args.quick,
            as_json=args.json,
            command=command,
            results_dir=results_dir,
            options=options,
        )
        return 0
    if args.name == "all" and args.quick:  # a smoke run: its page stays beside its results
        doc_path = results_dir / doc_path.name
    path = write_report(list(registry), machine_facts(), results_dir=results_dir, doc_path=doc_path)
    print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
