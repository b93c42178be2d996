"""The demo's fake agent backend, in a process of its own.

In the demo's process, the backend's HTTP server threads and run timers would compete with
the engine threads for one interpreter, and the demo's hot-path figure would be mostly the
engine threads waiting for them. The child is forked before the demo starts any thread or
connection, serves until it is told to stop or the demo's end of the pipe closes, and hands
its runs back over the pipe for verification.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Self

from agent_sessions.testing.fake_backend import FakeAgentBackend, FakeRun

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
_RUNS, _STOP = "runs", "stop"


class BackendProcess:
    """:class:`FakeAgentBackend` in a forked child: ``url`` to call it, :meth:`runs` for
    every run it served, by id."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child_end,), name="asc-demo-agent-backend", daemon=True
        )
        self._process.start()
        child_end.close()
        if not self._pipe.poll(START_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"the fake agent backend did not start within {START_TIMEOUT_S} s")
        self.url: str = self._pipe.recv()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def runs(self) -> dict[str, FakeRun]:
        """Every run the backend served, by run id."""
        self._pipe.send(_RUNS)
        runs: dict[str, FakeRun] = self._pipe.recv()
        return runs

    def close(self) -> None:
        """Stop the child (killed if it does not stop within :data:`STOP_TIMEOUT_S`)."""
        with contextlib.suppress(OSError):  # the child is gone already
            self._pipe.send(_STOP)
        self._pipe.close()
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _serve(pipe: Connection) -> None:
    """The child: serve, answer ``runs`` requests, stop on ``stop`` or when the pipe closes.

    Ctrl-C reaches the terminal's whole process group; the demo stops this child itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with FakeAgentBackend() as fake:
        pipe.send(fake.url)
        while True:
            try:
                request = pipe.recv()
            except EOFError:
                return
            if request != _RUNS:
                return
            pipe.send({run.run_id: run for run in fake.runs()})
