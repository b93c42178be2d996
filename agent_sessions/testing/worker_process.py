"""``agent-sessions worker`` as a child process group: for the demo, benchmarks and tests.

One implementation of the two things they all need: an environment that gives the child
exactly the parent's :class:`Settings`, and a stop that really ends the whole group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from pydantic import AliasChoices

from cache.settings import Settings

STOP_GRACES_S = (5.0, 10.0)
"""SIGTERM, wait; SIGTERM again (RQ's cold shutdown), wait; then SIGKILL."""


def _env_names(name: str, alias: object) -> list[str]:
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    return [f"ASC_{name.upper()}"]


def settings_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with every setting replaced by
    ``settings``' value, so a child process reads exactly the same configuration."""
    env = dict(os.environ if base is None else base)
    for name, field in Settings.model_fields.items():
        names = _env_names(name, field.validation_alias)
        for env_name in names:
            env.pop(env_name, None)
        value = getattr(settings, name)
        if value is not None:
            env[names[-1]] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


class WorkerProcess:
    """``python -m agent_sessions worker -n N [args]`` in its own process group, with a log
    file; ``env`` adds variables that are not settings (``ASC_LOG_FORMAT``, ``TMPDIR``)."""

    def __init__(
        self,
        settings: Settings,
        processes: int = 1,
        *,
        log: Path | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.owns_log = log is None
        self.keep_log = False
        """Whether a log file this object created outlives :meth:`stop` (a caller-given one
        always does)."""
        if log is None:
            fd, path = tempfile.mkstemp(prefix="asc-workers-", suffix=".log")
            os.close(fd)
            log = Path(path)
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent_sessions", "worker", "-n", str(processes), *args],
                env=settings_env(settings) | dict(env or {}),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, graces_s: tuple[float, ...] = STOP_GRACES_S) -> bool:
        """SIGTERM the group until it is gone, SIGKILL what outlives ``graces_s``.

        Returns whether it ended on SIGTERM. The whole group, not just the leader: the pool's
        leader may exit before a worker that is still finishing its job.
        """
        try:
            for grace_s in graces_s:
                if not self._signal(signal.SIGTERM) or self._gone_within(grace_s):
                    return True
            return False
        finally:
            self.kill()
            if self.owns_log and not self.keep_log:
                self.log.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the whole group: no worker gets to clean up."""
        self._signal(signal.SIGKILL)
        self.proc.wait()

    def _gone_within(self, grace_s: float) -> bool:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self.proc.poll()  # reap the leader, so that only live members answer signal 0
            if not self._signal(0):
                return True
            time.sleep(0.05)
        return False

    def _signal(self, sig: int) -> bool:
        """Signal the process group; ``False`` once nobody is left in it."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return False
        return True
