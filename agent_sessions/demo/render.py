"""The demo's report as text: one line per fact, then the verdict and any problems."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agent_sessions.demo.report import Report

MAX_PROBLEMS_SHOWN = 20


def render_text(report: Report) -> str:
    """The human report: one line per fact, then the verdict and any problems."""
    f = report.facts
    lines = [
        f"Agent-session demo: tenant {f['tenant']}, key prefix {f['prefix']}, seed {f['seed']}",
        *(f"  {label:<13} {text}" for label, text in _fact_lines(f)),
        f"  {'verified':<13} {_verdict(report)}",
        *_problem_lines(report.problems),
    ]
    if "worker_log" in f:
        lines.append(f"  {'worker log':<13} {f['worker_log']}")
    return "\n".join(lines)


def _fact_lines(f: Mapping[str, object]) -> list[tuple[str, str]]:
    lag = _pair(f["flush_lag_s"])
    return [
        (
            "workload",
            f"{f['runs']} workflow runs x {f['nodes']} Agent nodes x {f['iterations']} "
            f"loop iterations, beside {f['conversations']} conversations x {f['turns']} turns "
            f"= {f['agent_runs']} agent runs on {f['threads']} threads",
        ),
        ("agent runs", _counts(f["agent_outcomes"]) + f" ({f['resumes']} resumed after a pause)"),
        ("workflows", _counts(f["workflow_outcomes"]) + "; all ended"),
        (
            "conversations",
            f"{f['conversations_ended']} ended, {f['config_switches']} switched their agent's "
            "config mid-way (the old session retired and cleaned up)",
        ),
        ("sessions", f"{f['sessions']} ({_counts(f['sessions_by_owner'])})"),
        ("hot path", _hot_path(f)),
        ("", HOT_PATH_INCLUDES.format(threads=f["threads"])),
        ("write-behind", _write_behind(f)),
        (
            "flush lag",
            f"p50 {lag[0]:.2f} s, p99 {lag[1]:.2f} s (flushed_at - updated_at, "
            f"{f['workers']} RQ workers)",
        ),
        ("cleanups", _cleanups(f)),
        ("audit", _audit(f)),
        (
            "wall time",
            f"{f['wall_s']:.1f} s (workload {f['workload_s']:.1f} s, "
            f"write-behind drain {f['drain_s']:.1f} s)",
        ),
    ]


HOT_PATH_INCLUDES = (
    "(wall = 2 Redis round trips + the calling thread's CPU + waiting for this interpreter, "
    "shared by {threads} engine thread(s), and for a CPU; the agent backend runs elsewhere)"
)


def _hot_path(f: Mapping[str, object]) -> str:
    (wall50, wall99), (cpu50, cpu99) = _pair(f["latency_ms"]), _pair(f["cpu_ms"])
    return (
        f"enter+finish per agent run: wall p50 {wall50:.2f} ms, p99 {wall99:.2f} ms; "
        f"CPU p50 {cpu50:.2f} ms, p99 {cpu99:.2f} ms"
    )


def _audit(f: Mapping[str, object]) -> str:
    counts = f.get("audit")
    if not isinstance(counts, Mapping):
        return "not run"
    shown = {finding: n for finding, n in counts.items() if n}
    return "every session of the prefix, Redis against Postgres: " + (
        _counts(shown) if shown else "no sessions"
    )


def _write_behind(f: Mapping[str, object]) -> str:
    ratio = f["coalescing"]
    coalesced = f"{ratio:.1f}x coalesced" if isinstance(ratio, float) else "coalescing n/a"
    return (
        f"{f['saves']} saves, {f['redis_writes']} Redis writes in all -> "
        f"{f['rows_flushed']} Postgres row writes ({coalesced})"
    )


def _cleanups(f: Mapping[str, object]) -> str:
    done, gave_up, sessions = (
        int(str(f[k])) for k in ("cleanups_done", "cleanups_gave_up", "sessions")
    )
    retired = sessions - done - gave_up
    return f"{done} done, {gave_up} gave up ({retired} sessions retired by a failed run need none)"


def _pair(value: object) -> tuple[float, float]:
    stats = value if isinstance(value, dict) else {}
    return float(stats.get("p50", 0.0)), float(stats.get("p99", 0.0))


def _counts(value: object) -> str:
    counts = value if isinstance(value, dict) else {}
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda x: -x[1]))


def _verdict(report: Report) -> str:
    if report.verified:
        return (
            f"OK: Postgres holds exactly the final state of all {report.facts['sessions']} sessions"
        )
    return f"FAILED: {len(report.problems)} problem(s)"


def _problem_lines(problems: Sequence[str]) -> list[str]:
    lines = [f"    - {problem}" for problem in problems[:MAX_PROBLEMS_SHOWN]]
    if len(problems) > MAX_PROBLEMS_SHOWN:
        lines.append(f"    ... and {len(problems) - MAX_PROBLEMS_SHOWN} more (see --json)")
    return lines
