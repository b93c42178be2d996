"""The pool's supervisor with plain child processes (no services): restarts, crash loops,
bounded stops, second signals, bursts."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workers.supervisor import Child, Limits, Supervisor, exit_description

FAST = Limits(crash_limit=3, crash_window_s=30, stop_timeout_s=2.0, tick_s=0.02)
REAL_SIGNAL = signal.signal
"""The fixture below replaces ``signal.signal``; a child that must ignore SIGTERM uses this."""


def sleeper() -> None:
    while True:
        time.sleep(0.05)


def stubborn() -> None:
    """Ignores SIGTERM, as a worker stuck in a job would."""
    REAL_SIGNAL(signal.SIGTERM, signal.SIG_IGN)
    sleeper()


def exits_at_once() -> None:
    return


def crashes() -> None:
    os._exit(3)


class Running:
    """A supervisor on a thread of the test (signals are sent to the children directly)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.status: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.status = self.supervisor.run()

    def pid_of(self, name: str, other_than: int | None = None, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.supervisor.pids().get(name)
            if pid is not None and pid != other_than:
                return pid
            time.sleep(0.01)
        raise AssertionError(f"{name} is not running (other than pid {other_than})")

    def join(self, timeout: float) -> int | None:
        self.thread.join(timeout)
        return None if self.thread.is_alive() else self.status


@pytest.fixture
def supervise(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Running]]:
    """Start a supervisor on a thread; ``signal.signal`` works only on the main thread, so the
    supervisor's own handlers are not installed here (the CLI tests send it real signals)."""
    monkeypatch.setattr(signal, "signal", lambda sig, handler: signal.SIG_DFL)
    started: list[Running] = []

    def start(*children: Child, limits: Limits = FAST, **kwargs: object) -> Running:
        running = Running(Supervisor(list(children), limits=limits, **kwargs))  # type: ignore[arg-type]
        running.thread.start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.supervisor.stop()
        running.join(10)


def test_a_child_that_dies_is_started_again_and_reported(
    supervise: Callable[..., Running],
) -> None:
    restarts: list[tuple[str, int, str]] = []
    running = supervise(
        Child("worker", sleeper, 1),
        Child("trigger", sleeper),
        on_restart=lambda child, pid, how: restarts.append((child.name, pid, how)),
    )
    first = running.pid_of("trigger")
    os.kill(first, signal.SIGKILL)
    second = running.pid_of("trigger", other_than=first)
    assert second != first
    assert restarts == [("trigger", first, "was killed by SIGKILL")]
    assert running.supervisor.pids()["worker 1"] > 0


def test_a_child_that_keeps_dying_ends_the_pool_with_status_1(
    supervise: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    running = supervise(Child("trigger", crashes), Child("worker", sleeper, 1))
    assert running.join(15) == 1
    (line,) = [r.getMessage() for r in caplog.records if "stopping the pool" in r.getMessage()]
    assert "trigger ended 3 times within 30s" in line and "exited with status 3" in line
    assert running.supervisor.pids() == {}


def test_sigkills_from_outside_never_end_the_pool(supervise: Callable[..., Running]) -> None:
    """Killing a child again and again (an operator, the OOM killer, a benchmark killing
    flushers) is answered with restarts: exiting the pool would not prevent the next kill."""
    running = supervise(Child("worker", sleeper, 1))
    pid = None
    for _ in range(FAST.crash_limit + 2):
        pid = running.pid_of("worker 1", other_than=pid)
        os.kill(pid, signal.SIGKILL)
    running.pid_of("worker 1", other_than=pid)
    assert running.join(0.5) is None, "the pool ended"


def test_a_stop_ends_children_that_ignore_it_at_the_bound(
    supervise: Callable[..., Running],
) -> None:
    running = supervise(Child("worker", stubborn, 1), Child("trigger", sleeper))
    pids = [running.pid_of("worker 1"), running.pid_of("trigger")]
    time.sleep(0.2)  # the stubborn child has installed its handler
    started = time.monotonic()
    running.supervisor.stop()
    assert running.join(FAST.stop_timeout_s + 5) == 0
    assert time.monotonic() - started < FAST.stop_timeout_s + 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_burst_ends_when_its_workers_have_ended(supervise: Callable[..., Running]) -> None:
    running = supervise(
        Child("worker", exits_at_once, 1, restart=False),
        Child("worker", exits_at_once, 2, restart=False),
        Child("trigger", sleeper),
    )
    assert running.join(10) == 0


def test_exit_descriptions() -> None:
    assert exit_description(0) == "exited"
    assert exit_description(2) == "exited with status 2"
    assert exit_description(-9) == "was killed by SIGKILL"
    assert exit_description(None) == "is still running"


def test_a_signal_reaching_a_fresh_child_before_its_own_handlers_acts_as_the_default(
    tmp_path: Path,
) -> None:
    """A child forked while the supervisor's handler is installed must not run the
    supervisor's stop logic (it would signal its siblings): it takes the default action."""
    supervisor = Supervisor([])
    marker = tmp_path / "ran"
    pid = os.fork()
    if pid == 0:  # the child: the inherited handler, as right after a fork
        signal.signal(signal.SIGTERM, supervisor._on_signal)
        os.kill(os.getpid(), signal.SIGTERM)
        marker.write_text("the handler returned")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert not marker.exists()
