"""The CPU benchmarks' plumbing without services: /proc and INFO parsing, CPU blocks, the
results they build, and results saved per snapshot variant."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.agent_state import agent_states
from bench.cpu import (
    CpuBlock,
    command_delta,
    command_stats,
    commands_per_call,
    cpu_delta,
    group_cpu_s,
    median_per_call,
    parse_stat,
    redis_cpu_s,
    run_cpu_interleaved,
)
from bench.harness import make_result
from bench.report import load_results, render, result_file, result_key, save_result, write_report

STAT = (
    "4242 (python (x) y) S 4200 4100 4100 0 -1 4194560 900 0 0 0 "
    "150 50 7 3 20 0 3 0 896208 3133440 387 18446744073709551615 0 0"
)


# --------------------------------------------------------------------------------- /proc, INFO


def test_parse_stat_reads_pid_group_and_all_four_cpu_fields() -> None:
    assert parse_stat(STAT) == (4242, 4100, 150 + 50 + 7 + 3)


def test_group_cpu_keeps_only_the_group(tmp_path: Path) -> None:
    for pid, group in ((4242, 4100), (4243, 4100), (5000, 1)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(
            STAT.replace("4242", str(pid), 1).replace("4100 4100", f"{group} {group}", 1)
        )
    (tmp_path / "self").mkdir()
    (tmp_path / "9999").mkdir()  # a process that ended meanwhile: no stat file
    found = group_cpu_s(4100, proc=tmp_path)
    assert set(found) == {4242, 4243}
    assert found[4242] == pytest.approx(210 / os.sysconf("SC_CLK_TCK"))


def test_cpu_delta_counts_new_processes_whole_and_drops_gone_ones() -> None:
    assert cpu_delta({1: 1.0, 2: 5.0}, {1: 1.5, 3: 0.25}) == {1: 0.5, 3: 0.25}


def test_info_replies() -> None:
    assert redis_cpu_s({"used_cpu_sys": "1.5", "used_cpu_user": 2.25}) == 3.75
    stats = command_stats(
        {
            "cmdstat_evalsha": {"calls": 3, "usec": 90, "usec_per_call": 30.0},
            "cmdstat_info": {"calls": 2, "usec": 40},
            "errorstat_ERR": 1,
        }
    )
    assert stats == {"evalsha": (3, 90.0), "info": (2, 40.0)}
    after = {"evalsha": (5, 150.0), "info": (9, 400.0), "hget": (1, 2.0), "get": (4, 8.0)}
    assert command_delta(stats | {"get": (4, 8.0)}, after) == {
        "evalsha": (2, 60.0),
        "hget": (1, 2.0),
    }


# --------------------------------------------------------------------------------- blocks


class FakeProbe:
    """A server whose CPU grows by 1 ms per reading and that ran one ``evalsha`` per reading."""

    def __init__(self) -> None:
        self.readings = 0

    def cpu_s(self) -> float:
        self.readings += 1
        return self.readings / 1000

    def commands(self) -> dict[str, tuple[int, float]]:
        return {"evalsha": (self.readings, 10.0 * self.readings)}


def test_cpu_blocks_alternate_and_leave_before_block_out() -> None:
    calls: list[str] = []
    arms = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    seen: list[int] = []
    out = run_cpu_interleaved(
        arms,
        FakeProbe(),
        blocks=3,
        per_block=2,
        warmup=1,
        before_block=lambda arm: calls.append(f"|{arm}:"),
        on_block=lambda i, _: seen.append(i),
    )
    assert "".join(calls) == "ab" + "|a:aa|b:bb" + "|b:bb|a:aa" + "|a:aa|b:bb"
    assert seen == [0, 1, 2]
    block = out["a"][0]
    assert block.calls == 2 and block.server_s == pytest.approx(0.001)
    assert block.commands == {"evalsha": (2, 20.0)}  # two readings within the block
    assert block.client_s >= 0 and block.wall_s >= 0


def test_per_call_figures_subtract_the_servers_idle_rate() -> None:
    block = CpuBlock(calls=100, wall_s=0.1, client_s=0.02, server_s=0.011, commands={})
    us = block.per_call_us(server_idle_rate=0.01)  # 1 ms of the 11 was idle
    assert us == pytest.approx({"client": 200.0, "server": 100.0, "total": 300.0, "wall": 1000.0})
    blocks = [block, CpuBlock(100, 0.1, 0.04, 0.011, {"evalsha": (100, 500.0)})]
    assert median_per_call(blocks, 0.01) == {
        "client": 300.0,
        "server": 100.0,
        "total": 400.0,
        "wall": 1000.0,
    }
    assert commands_per_call(blocks) == {"evalsha": 2.5}


def test_cpu_per_iteration_reports_ours_over_raw_totals() -> None:
    from bench.cpu_per_iteration import QUICK, _result, _warm_facts

    ours = [CpuBlock(1000, 0.5, 0.4, 0.1, {"evalsha": (1000, 60_000.0)})] * 2
    raw = [CpuBlock(1000, 0.2, 0.1, 0.05, {"evalsha": (1000, 20_000.0)})] * 2
    tuned = [CpuBlock(1000, 0.5, 0.35, 0.1, {"evalsha": (1000, 60_000.0)})] * 2
    warm = {"ours": [CpuBlock(1000, 0.4, 0.3, 0.1, {})], "raw": [CpuBlock(1000, 0.1, 0.1, 0.0, {})]}
    facts = {"server_idle_cpu_ms_per_s": 0.0, "snapshot": "realistic", **_warm_facts(warm, 0.0)}
    result = _result({"ours": ours, "raw": raw, "ours_gc_tuned": tuned}, QUICK, facts)
    assert (result.value, result.baseline, result.ratio) == (500.0, 150.0, 3.333)
    assert result.met is False and result.goal == "<= 2.0"
    assert result.extra["ours_us"]["client"] == 400.0 and result.extra["server_ratio"] == 2.0
    assert result.extra["server_us_by_command"]["ours"] == {"evalsha": 60.0}
    assert [row["value"] for row in result.extra["also"]] == [400.0, 100.0, 450.0, 400.0]
    assert result.extra["also"][-1]["baseline"] == 100.0
    assert result.extra["gc_tuned_vs_default"] == 0.9
    assert result.extra["cpu_warm_ratio"] == 4.0 and result.extra["cpu_warm_block_ratios"] == [4.0]


def test_hot_path_reports_its_cpu_warm_pass_beside_the_plain_headline() -> None:
    from bench.hot_path import QUICK, _result, _warm_facts

    plain = {"ours": [[300_000] * 3] * 2, "raw": [[200_000] * 3] * 2, "raw_codec": [[250_000]] * 2}
    warm = {
        "ours": [[260_000], [240_000]],
        "raw": [[130_000], [120_000]],
        "raw_codec": [[200_000]] * 2,
    }
    result = _result(plain, QUICK, {"snapshot": "realistic", **_warm_facts(warm)})
    assert (result.value, result.baseline, result.ratio) == (300.0, 200.0, 1.5)
    assert result.extra["cpu_warm_ours_p50_us"] == 250.0
    assert result.extra["cpu_warm_raw_p50_us"] == 125.0
    assert result.extra["cpu_warm_ratio"] == 2.0
    assert result.extra["cpu_warm_ratio_vs_raw_codec"] == 1.25
    assert result.extra["cpu_warm_block_ratios"] == [2.0, 2.0]
    assert result.extra["cpu_warm_blocks"] == QUICK.warm_blocks


def test_flush_cpu_subtracts_the_idle_pool_per_second() -> None:
    from bench.flush_cpu import QUICK, Rep, Window, _result

    idle = Window(seconds=2.0, pool={1: 0.02, 2: 0.0}, server=0.006, commands={"zcard": (5, 50.0)})
    load = Window(seconds=4.0, pool={1: 0.14, 2: 0.4}, server=0.5, commands={})
    rep = Rep(idle, load, iterations=6000, loop_s=3.0, rows=200, flushes=40)
    assert rep.net_cpu_s() == pytest.approx(0.54 - 0.04)
    assert rep.ms_per_row() == pytest.approx(2.5)
    assert rep.ms_per_row([1]) == pytest.approx(0.5)
    result = _result([rep], QUICK, {"redis_alone_cpu_ms_per_s": 1.5})
    assert (result.value, result.unit, result.met) == (2.5, "ms", False)
    assert result.extra["also"][0]["value"] == 3.0 and result.extra["also"][0]["baseline"] == 1.5
    assert result.extra["rows_per_flush"] == 5.0
    assert result.extra["idle_redis_us_per_s_by_command"] == {"zcard": 25.0}


def test_parallel_loops_ratio_is_ours_over_raw_at_the_largest_n() -> None:
    from bench.parallel_loops import Curves, Plan, _result

    curves = Curves(drain_s=[0.5])
    for n, ours, raw, original in ((1, 1000.0, 2000.0, 200.0), (8, 3000.0, 5000.0, 250.0)):
        for arm, rate in (("ours", ours), ("raw", raw), ("original", original)):
            curves.rates[arm][n] = [rate]
    plan = Plan(sizes=(1, 8), seconds=1.0, reps=1, quick=False)
    result = _result(curves, plan, agent_states("small"))
    assert (result.value, result.baseline, result.ratio, result.met) == (3000, 5000, 0.6, True)
    assert result.extra["ratio_vs_original"] == 12.0 and result.extra["met_vs_original"] is True
    assert result.extra["variant"] == "--snapshot small" and "plot" not in result.extra


def test_a_quick_run_draws_its_plots_outside_docs() -> None:
    from bench.plot import DOCS_DIR, plot_path
    from bench.report import RESULTS_DIR

    assert plot_path("parallel_loops.png", quick=True) == RESULTS_DIR / "parallel_loops.png"
    assert plot_path("parallel_loops.png", quick=False) == DOCS_DIR / "parallel_loops.png"


def test_the_plots_draw_a_png_from_their_curves(tmp_path: Path) -> None:
    from bench.plot import per_second, plot_parallel_loops, plot_write_behind

    points = [
        {"n": n, "ours": 1000.0 * n, "raw": 2000.0 * n, "original": 200.0, "ratio": 0.5}
        for n in (1, 2)
    ]
    reps = {arm: {1: [900.0, 1100.0], 2: [1900.0, 2100.0]} for arm in ("ours", "raw", "original")}
    for path in (
        plot_parallel_loops(points, reps, 0.5, tmp_path / "a.png"),
        plot_write_behind([10.0, 10.5, 11.2], [11.0, 12.1], [1.0, 1.6], 1.0, tmp_path / "b.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert per_second([10.0, 10.5, 11.2, 12.9], start=10.0) == ([0.0, 1.0, 2.0], [2, 1, 1])


# --------------------------------------------------------------------------------- variants


def test_a_variant_is_saved_and_listed_beside_the_default(tmp_path: Path) -> None:
    default = make_result("hot_path", "t", value=2.0, baseline=1.0, goal="<= 3", unit="us")
    small = default.with_extra(variant="--snapshot small")
    other = make_result("scale", "s", value=1.0, baseline=None, goal=">= 0.9", unit="x")
    for result in (other, small, default):
        save_result(result, tmp_path)
    assert result_file(small) == "hot_path--snapshot=small.json"
    assert result_key(small) == "hot_path --snapshot small" and result_key(default) == "hot_path"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "hot_path--snapshot=small.json",
        "hot_path.json",
        "scale.json",
    ]
    assert json.loads((tmp_path / "hot_path.json").read_text())["extra"] == default.extra
    assert set(load_results(tmp_path)) == {"hot_path", "hot_path --snapshot small", "scale"}
    doc = write_report(
        ["hot_path", "scale"], {"nproc": "2"}, results_dir=tmp_path, doc_path=tmp_path / "b.md"
    )
    page = doc.read_text()
    rows = [line.split(" | ")[0] for line in page.splitlines() if line.startswith("| `")]
    assert rows == ["| `hot_path`", "| `hot_path --snapshot small`", "| `scale`"]
    assert "### `hot_path --snapshot small`" in render([small], {})
