"""``agent-sessions demo`` end to end: a real subprocess against the private Redis and a fresh
database (the demo migrates it), with its own worker pool and fake agent backend."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.servers import Database

SMALL = ["--runs", "4", "--nodes", "2", "--iterations", "6", "--conversations", "3", "--turns", "6"]
DEMO_TIMEOUT_S = 150


def demo_env(redis_url: str, database_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without any ASC_* setting, pointed at the test servers.

    TMPDIR keeps the worker log a failing demo leaves behind inside the test's directory.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASC_") and k != "RQ_REDIS_URL"}
    return env | {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "TMPDIR": str(tmp), **extra}


def run_demo(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_sessions", "demo", *args],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
    )


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no report on stdout; stderr:\n{proc.stderr}"
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def tenant_rows(database_url: str, tenant: str) -> list[tuple[str, int]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT status, version FROM agent_runtime_sessions WHERE tenant_id = %s",
            (tenant,),
        ).fetchall()
    return [(str(status), int(version)) for status, version in rows]


def test_demo_drives_the_stack_and_verifies_postgres(
    redis_url: str, database_url: Database, tmp_path: Path
) -> None:
    env = demo_env(redis_url, database_url.url, tmp_path)
    proc = run_demo([*SMALL, "--seed", "7", "--json"], env)
    report = last_json(proc)

    assert proc.returncode == 0, report["failures"]
    assert report["verified"] is True
    assert report["failures"] == []
    assert (report["runs"], report["nodes"], report["iterations"]) == (4, 2, 6)
    assert report["agent_runs"] == 4 * 2 * 6 + 3 * 6
    assert sum(report["agent_outcomes"].values()) == 48 + 18
    assert sum(report["workflow_outcomes"].values()) == 4
    assert report["conversations_ended"] == 3
    assert report["config_switches"] == 1  # conversation 0 of 3 (every 3rd)
    by_owner = report["sessions_by_owner"]
    assert 0 < by_owner["workflow_run"] <= 4 * 2 and 0 < by_owner["conversation"] <= 3 + 1
    assert report["sessions"] == by_owner["workflow_run"] + by_owner["conversation"]
    assert report["rows_flushed"] >= report["sessions"]
    assert report["cleanups_gave_up"] == 0
    assert report["tenant"].startswith("demo-")
    rows = tenant_rows(database_url.url, report["tenant"])
    assert len(rows) == report["sessions"]
    assert {status for status, _ in rows} == {"cleaned"}
    assert sum(version for _, version in rows) == report["redis_writes"]
    assert report["prefix"] == "asc-demo"  # the deployment's prefix (asc) plus -demo
    assert 0 < report["cpu_ms"]["p50"] <= report["latency_ms"]["p50"]


def test_demo_output_in_a_pipe_is_plain_lines_and_says_what_the_hot_path_includes(
    redis_url: str, database_url: Database, tmp_path: Path
) -> None:
    """Before, a pipe got the bare labels "agent runs" and "write-behind" of the progress
    bars, and a hot-path figure that was mostly the wait for the in-process fake backend."""
    env = demo_env(redis_url, database_url.url, tmp_path, ASC_KEY_PREFIX="team7")
    proc = run_demo([*SMALL, "--seed", "7"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    progress = proc.stderr.splitlines()
    assert "agent runs: 66 agent runs" in progress
    assert any(
        re.fullmatch(r"agent runs: 66 of 66 agent runs done in [\d.]+ s", x) for x in progress
    )
    settled = r"write-behind: (\d+) of \1 sessions flushed and cleaned up in [\d.]+ s"
    assert any(re.fullmatch(settled, line) for line in progress), proc.stderr
    report = proc.stdout.splitlines()
    assert "key prefix team7-demo" in report[0]
    (hot,) = [i for i, line in enumerate(report) if line.lstrip().startswith("hot path")]
    assert re.search(r"wall p50 [\d.]+ ms, p99 [\d.]+ ms; CPU p50 [\d.]+ ms", report[hot])
    assert "2 Redis round trips" in report[hot + 1] and "runs elsewhere" in report[hot + 1]


def test_demo_reports_cleanups_that_never_finished_and_exits_1(
    redis_url: str, database_url: Database, tmp_path: Path
) -> None:
    """A backend that never confirms a cleanup in time, with one attempt: every session the
    workflow end had to clean up is given up, and verification names each one."""
    env = demo_env(
        redis_url,
        database_url.url,
        tmp_path,
        ASC_CLEANUP_WAIT_S="0.001",
        ASC_CLEANUP_ATTEMPTS="1",
    )
    proc = run_demo([*SMALL, "--json"], env)
    report = last_json(proc)

    assert proc.returncode == 1
    assert report["verified"] is False
    assert report["cleanups_gave_up"] > 0
    gave_up = [f for f in report["failures"] if "cleanup did not finish" in f]
    assert gave_up
    assert all(
        f.startswith("asc-demo:{s")
        and (":session:demo-" in f or ":conversation-session:demo-" in f)
        for f in gave_up
    )
    assert Path(report["worker_log"]).parent == tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "0"], "--runs"),
        (["--fail-rate", "1.5"], "--fail-rate"),
        (["--fail-rate", "0.6", "--pause-rate", "0.6"], "must not exceed 1"),
        (["--prefix", "no spaces"], "--prefix"),
        (["--workers", "many"], "--workers"),
    ],
)
def test_bad_flags_are_a_one_line_usage_error(
    args: list[str], message: str, tmp_path: Path
) -> None:
    env = demo_env("redis://127.0.0.1:1/0", "postgresql://nobody@127.0.0.1:1/none", tmp_path)
    proc = run_demo(args, env)

    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert message in errors[0]
    assert proc.stdout == ""
