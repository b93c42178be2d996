"""The benchmark harness without services: statistics, goals, the JSON line, registry, report."""

from __future__ import annotations

import json
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS, FAULT, main
from bench.fault_recovery import CASES, FAULTS, Case, combine
from bench.faults import Saves, first_held, landings, longest_wait_per_kill, waits_after
from bench.harness import (
    RESULT_KEYS,
    Benchmark,
    HarnessError,
    Option,
    Result,
    arm_p50_us,
    block_ratios,
    goal_met,
    make_result,
    median,
    ours_vs_original_facts,
    parse_goal,
    percentile,
    ratio,
    run_interleaved,
    run_interleaved_warm,
    summarize,
)
from bench.report import load_results, render, save_result

FAKE_MODULE = "bench_fake_for_tests"


# --------------------------------------------------------------------------------- statistics


def test_median_of_odd_and_even_counts() -> None:
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5


def test_p99_is_nearest_rank() -> None:
    samples = list(range(1, 101))  # 1..100
    assert percentile(samples, 99) == 99
    assert percentile(samples, 100) == 100
    assert percentile(samples, 50) == 50
    assert percentile([7], 99) == 7


def test_p99_of_a_few_samples_is_the_largest() -> None:
    assert percentile([5, 1, 9, 3], 99) == 9


def test_stats_refuse_empty_or_bad_input() -> None:
    with pytest.raises(HarnessError):
        median([])
    with pytest.raises(HarnessError):
        percentile([], 99)
    with pytest.raises(HarnessError):
        percentile([1], 0)
    with pytest.raises(HarnessError):
        ratio(1.0, 0.0)


def test_summarize() -> None:
    summary = summarize([float(n) for n in range(1, 201)])
    assert (summary.median, summary.p99, summary.count) == (100.5, 198.0, 200)


def test_ratio() -> None:
    assert ratio(130.0, 100.0) == pytest.approx(1.3)


# --------------------------------------------------------------------------------- goals


@pytest.mark.parametrize(
    ("goal", "observed", "met"),
    [
        ("<= 1.3", 1.3, True),
        ("<= 1.3", 1.31, False),
        ("< 1.3", 1.3, False),
        (">= 5000", 5000, True),
        ("> 5000", 4999, False),
        ("<=2", 1.0, True),
    ],
)
def test_goal_met(goal: str, observed: float, met: bool) -> None:
    assert goal_met(goal, observed) is met


def test_goal_without_observation_is_not_met() -> None:
    assert goal_met("<= 1.3", None) is False


@pytest.mark.parametrize("goal", ["1.3", "about 1.3", "<= x", "== 1"])
def test_malformed_goal_is_refused(goal: str) -> None:
    with pytest.raises(HarnessError):
        parse_goal(goal)


def test_make_result_computes_ratio_and_met() -> None:
    result = make_result("b", "m", value=260.0, baseline=200.0, goal="<= 1.3", unit="us")
    assert result.ratio == 1.3
    assert result.met is True
    assert result.extra["goal_on"] == "ratio"


def test_goal_on_value_ignores_the_ratio() -> None:
    result = make_result(
        "b", "m", value=900.0, baseline=None, goal="<= 1000", unit="ms", goal_on="value"
    )
    assert result.ratio is None
    assert result.met is True


# --------------------------------------------------------------------------------- result JSON


def test_result_round_trips_through_json() -> None:
    result = make_result("b", "m", value=1.0, baseline=2.0, goal="<= 1.3", unit="us")
    again = Result.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result


def test_result_from_dict_needs_the_seven_keys() -> None:
    with pytest.raises(HarnessError, match="baseline"):
        Result.from_dict(
            {"name": "b", "metric": "m", "value": 1, "ratio": 1, "goal": "", "unit": ""}
        )


# --------------------------------------------------------------------------------- timing


def test_run_interleaved_alternates_block_order() -> None:
    calls: list[str] = []
    arms = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    seen: list[int] = []
    samples = run_interleaved(
        arms, blocks=3, per_block=2, warmup=1, on_block=lambda i, _: seen.append(i)
    )
    assert calls == ["a", "b", "a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert [len(block) for block in samples["a"]] == [2, 2, 2]
    assert all(ns >= 0 for block in samples["b"] for ns in block)
    assert seen == [0, 1, 2]


def _children() -> set[int]:
    """The pids of this process's live children (from ``/proc``)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                found.add(int(entry))
    return found


def test_the_warm_pass_runs_its_blocks_beside_a_busy_loop_and_stops_it() -> None:
    before = _children()
    during: list[set[int]] = []
    samples = run_interleaved_warm(
        {"a": lambda: during.append(_children() - before)}, blocks=2, per_block=1, warmup=1
    )
    assert [len(block) for block in samples["a"]] == [1, 1]
    assert len(during) == 3 and all(len(pids) == 1 for pids in during)
    assert _children() == before


# --------------------------------------------------------------------------------- registry + CLI


@pytest.fixture
def fake_benchmark() -> Iterator[Benchmark]:
    """A registered benchmark module that needs no services."""
    module = types.ModuleType(FAKE_MODULE)

    def run(quick: bool) -> Result:
        print("progress: working")
        return make_result(
            "fake",
            "per-call time",
            value=120.0 if quick else 140.0,
            baseline=100.0,
            goal="<= 1.3",
            unit="us",
            extra={"spread": "block ratios 1.1-1.3"},
        )

    module.run = run  # type: ignore[attr-defined]
    sys.modules[FAKE_MODULE] = module
    yield Benchmark(FAKE_MODULE, "a fake for the harness tests")
    del sys.modules[FAKE_MODULE]


@pytest.fixture
def benchmark_with_an_option() -> Iterator[Benchmark]:
    """A registered benchmark module with its own ``--fault`` option."""
    module = types.ModuleType(FAKE_MODULE + "_option")

    def run(quick: bool, fault: str | None = None) -> Result:
        value = {None: 1.0, "a": 2.0, "b-c": 3.0}[fault]
        return make_result("opt", "m", value=value, baseline=1.0, goal="<= 9", unit="s")

    module.run = run  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    option = Option("--fault", "one case", choices=("a", "b-c"))
    yield Benchmark(module.__name__, "has an option", options=(option,))
    del sys.modules[module.__name__]


def test_a_benchmark_option_reaches_its_run_and_the_command(
    benchmark_with_an_option: Benchmark, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = {"opt": benchmark_with_an_option}
    main(["opt", "--fault", "b-c", "--json"], registry=registry, results_dir=tmp_path)
    out = capsys.readouterr().out.strip().splitlines()
    data = json.loads(out[-1])
    assert data["value"] == 3.0
    assert data["extra"]["command"] == "python -m bench opt --fault b-c --json"
    assert out[0].startswith("== opt --fault b-c: ")
    main(["opt"], registry=registry, results_dir=tmp_path)  # without it: the default
    assert json.loads((tmp_path / "opt.json").read_text())["value"] == 1.0


@pytest.mark.parametrize("name", ["fake", "all"])
def test_a_benchmark_option_is_refused_elsewhere(
    benchmark_with_an_option: Benchmark,
    fake_benchmark: Benchmark,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    registry = {"opt": benchmark_with_an_option, "fake": fake_benchmark}
    with pytest.raises(SystemExit) as exited:
        main([name, "--fault", "a"], registry=registry, results_dir=tmp_path)
    assert exited.value.code == 2
    assert f"--fault is an option of opt, not of {name}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_fault_recovery_declares_the_faults_it_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert FAULT in BENCHMARKS["fault_recovery"].options
    assert FAULT.choices == FAULTS == tuple(CASES)
    with pytest.raises(SystemExit):
        main(["fault_recovery", "--fault", "scheduler"])
    assert "invalid choice: 'scheduler'" in capsys.readouterr().err


def _no_machine_facts(**_: object) -> dict[str, str]:
    return {"nproc": "2", "cpu": "test CPU"}


def test_json_flag_makes_the_last_line_the_result(
    fake_benchmark: Benchmark, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        ["fake", "--quick", "--json"], registry={"fake": fake_benchmark}, results_dir=tmp_path
    )
    lines = capsys.readouterr().out.strip().splitlines()
    data = json.loads(lines[-1])
    assert status == 0
    assert set(data) == {*RESULT_KEYS, "extra"}
    assert (data["name"], data["value"], data["baseline"], data["ratio"]) == (
        "fake",
        120.0,
        100.0,
        1.2,
    )
    assert data["extra"]["met"] is True
    assert data["extra"]["command"] == "python -m bench fake --quick --json"
    assert any("progress" in line for line in lines[:-1])
    assert (tmp_path / "fake.json").is_file()


def test_a_missed_goal_still_exits_zero(
    fake_benchmark: Benchmark, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["fake", "--json"], registry={"fake": fake_benchmark}, results_dir=tmp_path)
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 0
    assert data["ratio"] == 1.4
    assert data["extra"]["met"] is False


def test_unknown_benchmark_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["no_such_benchmark"])
    assert exited.value.code != 0
    assert "invalid choice" in capsys.readouterr().err


def test_help_lists_every_registered_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert all(name in out for name in [*BENCHMARKS, "all", "report"])


def test_registered_modules_expose_run() -> None:
    assert "hot_path" in BENCHMARKS
    for benchmark in BENCHMARKS.values():
        assert callable(benchmark.load())


def test_a_module_without_run_is_refused() -> None:
    with pytest.raises(HarnessError, match="run"):
        Benchmark("bench.report", "not a benchmark").load()


def test_all_runs_every_benchmark_and_writes_the_page(
    fake_benchmark: Benchmark, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bench.__main__.machine_facts", _no_machine_facts)
    doc = tmp_path / "docs" / "benchmarks.md"
    results = tmp_path / "results"
    registry = {"fake": fake_benchmark}
    status = main(["all"], registry=registry, results_dir=results, doc_path=doc)
    page = doc.read_text()
    assert status == 0
    assert "| `fake` |" in page
    assert "`python -m bench all`" in page
    assert "test CPU" in page
    doc.unlink()
    assert main(["all", "--quick"], registry=registry, results_dir=results, doc_path=doc) == 0
    assert not doc.exists()  # a quick run never touches docs/
    assert "`python -m bench all --quick`" in (results / "benchmarks.md").read_text()


def test_all_reports_a_failing_benchmark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("bench.__main__.machine_facts", _no_machine_facts)
    broken = Benchmark("bench.report", "has no run()")
    doc = tmp_path / "benchmarks.md"
    status = main(["all"], registry={"broken": broken}, results_dir=tmp_path, doc_path=doc)
    assert status == 1
    assert "No saved result for: `broken`" in doc.read_text()
    assert "failed: broken" in capsys.readouterr().err


# --------------------------------------------------------------------------------- report


def test_report_page_from_saved_results(tmp_path: Path) -> None:
    result = make_result(
        "hot_path", "t", value=1300.0, baseline=1000.0, goal="<= 1.2", unit="us",
        extra={"spread": "a|b", "command": "python -m bench hot_path"},
    )  # fmt: skip
    save_result(result, tmp_path)
    loaded = load_results(tmp_path)
    page = render(list(loaded.values()), {"nproc": "2"}, missing=["flush_lag"])
    assert loaded == {"hot_path": result}
    assert "| `hot_path` | t | 1,300 µs | 1,000 µs | 1.30 | ratio <= 1.2 | **no** | a\\|b |" in page
    assert "No saved result for: `flush_lag`" in page
    assert "- nproc: 2" in page


def test_ours_vs_original_facts_and_block_ratios() -> None:
    """The loop-shaped benchmarks' shared facts: medians in µs, per-block ratios, the floor."""
    us = 1000
    samples = {
        "ours": [[2 * us, 2 * us], [4 * us, 4 * us]],
        "original": [[10 * us, 10 * us], [10 * us, 10 * us]],
        "raw": [[1 * us], [1 * us]],
    }
    assert block_ratios(samples) == [0.2, 0.4]
    assert arm_p50_us(samples, "raw") == 1.0
    ours, original, facts = ours_vs_original_facts(samples)
    assert (ours.median, original.median) == (3.0, 10.0)
    assert facts["floor_ratio"] == 0.1 and facts["ours_vs_raw"] == 3.0
    assert facts["speedup"] == 3.3 and facts["spread"] == "block ratios 0.200-0.400 over 2 blocks"


def test_hot_path_spread_is_the_middle_eighty_percent_of_block_ratios() -> None:
    from bench.hot_path import _deciles

    ratios = [1.0 + i / 100 for i in range(101)]  # 1.00 .. 2.00
    low, high = _deciles(ratios)
    assert low == pytest.approx(1.10, abs=0.011) and high == pytest.approx(1.90, abs=0.011)
    assert _deciles([1.3]) == (1.3, 1.3)


# --------------------------------------------------------------------------------- fault_recovery


def test_landings_find_each_saves_first_write_and_the_lost_ones() -> None:
    saves = Saves({("r", "a"): {1: 10.0, 2: 10.5, 3: 11.0}, ("r", "b"): {1: 10.2}}, count=4)
    log = {("r", "a"): ([2], [12.0])}  # v2 written at 12.0; v3 never; b never
    found = landings(saves, log)
    assert sorted(found.pairs) == [(10.0, 12.0), (10.5, 12.0)]
    assert sorted(found.lost) == ["r/a v3", "r/b v1"]
    assert found.checked == 4


def test_waits_after_a_kill_and_per_kill_windows() -> None:
    pairs = [(1.0, 2.0), (4.0, 7.0), (6.0, 6.5), (9.0, 9.5)]  # (saved, landed)
    assert waits_after(pairs, 5.0) == [2.0, 0.5, 0.5]  # 7 - max(4, 5), 6.5 - 6, 9.5 - 9
    assert waits_after(pairs, 5.0, saved_before=6.0) == [2.0]
    # kill 1 at 3.0: saves made before 8.0 -> 4.0 (7 - 4) ; kill 2 at 8.0: 0.5
    assert longest_wait_per_kill(pairs, [3.0, 8.0]) == [3.0, 0.5]
    assert longest_wait_per_kill(pairs, [20.0]) == [0.0]


def test_first_held_times_each_check_from_one_start() -> None:
    polls = {"a": 0, "b": 0}

    def after(name: str, n: int) -> Callable[[], bool]:
        def check() -> bool:
            polls[name] += 1
            return polls[name] >= n

        return check

    start = time.time()
    seen = first_held({"a": after("a", 1), "b": after("b", 3)}, since=start, timeout_s=5, poll_s=0)
    assert list(seen) == ["a", "b"] and 0 <= seen["a"] <= seen["b"]
    assert polls == {"a": 1, "b": 3}  # a check that held is not asked again
    with pytest.raises(HarnessError, match="waiting for never"):
        first_held({"never": lambda: False}, since=start, timeout_s=0, poll_s=0)


def _case(
    fault: str,
    measured_s: float,
    bound_s: float,
    goal: float,
    *,
    lost: list[str] | None = None,
    problems: list[str] | None = None,
) -> Case:
    return Case(fault, "t", measured_s, "b", bound_s, goal, 10, lost or [], problems or [])


def test_fault_recovery_reports_the_worst_share_of_its_own_goal() -> None:
    cases = [
        _case("worker", 1.5, 1.0, 3.0),  # ratio 1.5 of goal 3: share 0.5
        _case("cleanup", 9.1, 13.0, 1.0),  # share 0.7
        _case("group-term", 2.0, 10.0, 1.0),  # share 0.2
    ]
    result = combine(cases)
    assert (result.value, result.baseline, result.ratio, result.goal) == (0.7, 1.0, 0.7, "<= 1")
    assert result.met is True
    assert result.extra["worst_case"] == "cleanup"
    assert result.extra["worker"]["ratio"] == 1.5 and result.extra["worker"]["goal"] == "<= 3"
    assert result.extra["saves_checked"] == 30 and result.extra["saves_lost"] == 0
    assert "worker 0.50, cleanup 0.70, group-term 0.20" in result.extra["spread"]
    worker_row = result.extra["also"][0]
    assert (worker_row["value"], worker_row["baseline"], worker_row["goal"]) == (1.5, 1.0, "<= 3")
    assert [row["met"] for row in result.extra["also"]] == [True, True, True]
    page = render([result], {"nproc": "2"})
    row = "| `fault_recovery` (also) | cleanup: t | 9.10 s | 13.0 s | 0.70 | value <= 13 s | yes |"
    assert row in page
    assert set(result.to_dict()) == {*RESULT_KEYS, "extra"}


def test_fault_recovery_misses_its_goal_on_a_lost_save_or_a_problem() -> None:
    lost = _case("worker", 1.0, 1.0, 3.0, lost=["r/a v3"])
    odd = _case("trigger", 1.0, 1.0, 3.0, problems=["restarts_flush_trigger = 1, expected 2"])
    slow = _case("group-term", 12.0, 10.0, 1.0)
    for case in (lost, odd, slow):
        assert not combine([case]).met
    assert combine([lost]).value == 0.333
    assert combine([lost, slow]).extra["worst_case"] == "group-term"
