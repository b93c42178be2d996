"""A thread that renews something (a shard's flush lock, a cleanup's lease) until stopped."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Heartbeat:
    """Calls ``beat`` every ``period_s`` on a daemon thread until :meth:`stop`, or until
    ``beat`` returns ``False`` (what it renews is gone; it says so itself)."""

    def __init__(self, beat: Callable[[], bool], period_s: float, name: str) -> None:
        self._beat = beat
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing; returns once no renewal is in flight."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            if not self._beat():
                return
