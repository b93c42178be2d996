"""A small process supervisor: the parent of ``agent-sessions worker``'s processes.

It starts every child (forked), restarts one that dies within :attr:`Limits.tick_s`,
logs how it died and reports each restart, gives up when one child keeps crashing (so that
the service manager restarts the whole pool with fresh state), and stops everything within
:attr:`Limits.stop_timeout_s` of a SIGTERM or SIGINT, whether the signal came to its pid
alone or to its whole process group. A second signal kills every child at once.

Why not RQ's ``WorkerPool``: it respawns only RQ workers (the flush trigger, the scheduler
and the metrics endpoint are ours), it neither logs how a worker died nor stops a crash
loop, and its stop waits on the workers without a bound. What is left of it once those
are fixed is its respawn loop, which is the part below.

The supervisor runs no thread of its own, so forking a child from it is safe; children
start with the default SIGTERM and SIGINT actions and install their own.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import FrameType

log = logging.getLogger(__name__)

_FORK = multiprocessing.get_context("fork")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Child:
    """One process the supervisor keeps running."""

    role: str
    """What it is, in logs and counters: ``worker``, ``flush-trigger``, ``scheduler``..."""
    target: Callable[[], None]
    """Runs in the forked process, which exits when it returns."""
    slot: int = 0
    """Which of several children of one role (1, 2, ...); 0 for a single one."""
    restart: bool = True
    """Whether a child that exits is started again (``False``: a burst worker's exit is its end)."""

    @property
    def name(self) -> str:
        return f"{self.role} {self.slot}" if self.slot else self.role


@dataclass(frozen=True)
class Limits:
    """How the supervisor reacts; the defaults are the README's bounds."""

    crash_limit: int = 5
    """Crashes of one child within ``crash_window_s`` that stop the pool instead of a
    restart. A crash is any end the child came to by itself (an exit, whatever its status,
    or a fatal signal such as SIGSEGV); a SIGKILL came from outside (an operator, the OOM
    killer, a test killing flushers on purpose) and is always answered with a restart,
    since exiting would not prevent the next one."""
    crash_window_s: float = 60.0
    stop_timeout_s: float = 8.0
    """After a stop signal, children still alive this long are killed (SIGKILL)."""
    tick_s: float = 0.1
    """How often the children are checked."""


def exit_description(exitcode: int | None) -> str:
    """``exited``, ``exited with status 3`` or ``was killed by SIGKILL``."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return "exited" if exitcode == 0 else f"exited with status {exitcode}"


@dataclass
class Supervisor:
    """Runs ``children`` until stopped; :meth:`run` returns the process's exit status."""

    children: Sequence[Child]
    limits: Limits = field(default_factory=Limits)
    on_restart: Callable[[Child, int, str], None] | None = None
    """Called in the supervisor after a child that died was started again, with the dead
    process's pid and how it died (to count it, and clean up after it)."""
    _running: dict[Child, BaseProcess] = field(default_factory=dict, init=False)
    _deaths: dict[Child, deque[float]] = field(default_factory=dict, init=False)
    _stop_at: float | None = field(default=None, init=False)
    _status: int = field(default=0, init=False)
    _pid: int = field(default_factory=os.getpid, init=False)

    def run(self) -> int:
        """Start every child and supervise them until a stop; 0 unless a crash loop ended it."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            for child in self.children:
                self._start(child)
            while not self._finished():
                time.sleep(self.limits.tick_s)
        finally:
            self._kill_all()  # nothing is left behind, whatever ended the loop
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self._status

    def stop(self) -> None:
        """Ask every child to stop (SIGTERM); the rest is killed at ``stop_timeout_s``."""
        if self._stop_at is None:
            self._stop_at = time.monotonic() + self.limits.stop_timeout_s
        self._signal_all(signal.SIGTERM)

    def pids(self) -> dict[str, int]:
        """The live children's pids by name."""
        return {child.name: p.pid for child, p in self._running.items() if p.pid is not None}

    # ------------------------------------------------------------------------- internals

    def _start(self, child: Child) -> None:
        process = _FORK.Process(target=_child_main, args=(child,), name=f"asc {child.name}")
        process.start()
        self._running[child] = process
        log.debug("%s started (pid %s)", child.name, process.pid)

    def _finished(self) -> bool:
        self._reap()
        if self._stop_at is None:
            if self._burst_done():
                log.info("every worker has finished its burst: stopping the pool")
                self.stop()
            return False
        if not self._running:
            return True
        if time.monotonic() >= self._stop_at:
            log.warning(
                "%s still running %.0fs after the stop signal; killing them",
                ", ".join(sorted(self.pids())),
                self.limits.stop_timeout_s,
            )
            self._kill_all()
            return True
        return False

    def _burst_done(self) -> bool:
        """Whether every child that was not to be restarted (burst workers) has ended."""
        finite = [child for child in self.children if not child.restart]
        return bool(finite) and not any(child in self._running for child in finite)

    def _reap(self) -> None:
        for child, process in list(self._running.items()):
            # pop: a second stop signal may have cleared the children meanwhile
            if process.exitcode is not None and self._running.pop(child, None) is not None:
                self._died(child, process)

    def _died(self, child: Child, process: BaseProcess) -> None:
        how = exit_description(process.exitcode)
        if self._stop_at is not None or not child.restart:
            log.info("%s (pid %s) %s", child.name, process.pid, how)
            return
        if self._crash_looping(child, process.exitcode):
            log.error(
                "stopping the pool: %s ended %d times within %.0fs (last: pid %s %s); "
                "exiting so that the service manager restarts it",
                child.name,
                self.limits.crash_limit,
                self.limits.crash_window_s,
                process.pid,
                how,
            )
            self._status = 1
            self.stop()
            return
        log.warning("%s (pid %s) %s; starting it again", child.name, process.pid, how)
        self._start(child)
        if self.on_restart is not None and process.pid is not None:
            try:
                self.on_restart(child, process.pid, how)
            except Exception:  # counting must never stop the supervision
                log.warning("could not count the restart of %s", child.name, exc_info=True)

    def _crash_looping(self, child: Child, exitcode: int | None) -> bool:
        if exitcode == -signal.SIGKILL:
            return False
        now = time.monotonic()
        deaths = self._deaths.setdefault(child, deque())
        deaths.append(now)
        while deaths and deaths[0] < now - self.limits.crash_window_s:
            deaths.popleft()
        return len(deaths) >= self.limits.crash_limit

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a child, before it put its own handlers in place
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        name = signal.Signals(signum).name
        if self._stop_at is None:
            log.info("%s: stopping the pool (a second signal kills it at once)", name)
            self.stop()
        else:
            log.warning("%s again: killing the pool's processes", name)
            self._kill_all()

    def _signal_all(self, sig: signal.Signals) -> None:
        for process in self._running.values():
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):  # gone: the next check reaps it
                    os.kill(process.pid, sig)

    def _kill_all(self) -> None:
        self._signal_all(signal.SIGKILL)
        for child, process in list(self._running.items()):
            process.join(timeout=2)
            log.info("%s (pid %s) %s", child.name, process.pid, exit_description(process.exitcode))
        self._running.clear()


def _child_main(child: Child) -> None:
    """The forked child: default stop signals (its target installs its own), then the target.

    An error that ends the target is logged (one record, with its traceback) and ends the
    child with status 1, rather than printed on stderr beside the log's lines.
    """
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    try:
        child.target()
    except Exception:
        log.exception("%s (pid %s) failed", child.name, os.getpid())
        sys.exit(1)
