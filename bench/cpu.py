"""CPU accounting for benchmarks: this process, a Redis server, and a process group.

- This process: ``time.process_time()`` (every thread of it, nanosecond clock).
- A Redis server: ``INFO cpu`` (``used_cpu_sys + used_cpu_user`` of the server process, its
  own ``getrusage``) and ``INFO commandstats`` (microseconds inside each command, scripts
  included, per command name).
- A process group (a worker pool started in a session of its own): ``/proc/<pid>/stat``
  ``utime + stime`` of every member, plus ``cutime + cstime`` (members' children that ended
  and were reaped), in clock ticks (10 ms on Linux).

:func:`run_cpu_interleaved` is :func:`bench.harness.run_interleaved` for CPU: arms alternate
in blocks, and each block records the calls' wall time, this process's CPU and the server's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench.harness import HarnessError, median

CommandStats = dict[str, tuple[int, float]]
"""``{command: (calls, microseconds)}`` as ``INFO commandstats`` counts them. Commands a
script runs (``redis.call``) are counted under their own name too, so a script's time is in
both its ``evalsha`` and theirs."""
PROBE_COMMANDS = frozenset({"info"})
"""What a probe itself sends; left out of every delta."""
PROC = Path("/proc")


# --------------------------------------------------------------------------------- Redis


def redis_cpu_s(info: Mapping[str, Any]) -> float:
    """Server CPU seconds (user + system) from an ``INFO cpu`` reply."""
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def command_stats(info: Mapping[str, Any]) -> CommandStats:
    """``{command: (calls, usec)}`` from an ``INFO commandstats`` reply."""
    return {
        name.removeprefix("cmdstat_"): (int(stats["calls"]), float(stats["usec"]))
        for name, stats in info.items()
        if isinstance(stats, Mapping)
    }


def command_delta(before: CommandStats, after: CommandStats) -> CommandStats:
    """What ran between two readings; commands that did not run, and the probe's own
    (:data:`PROBE_COMMANDS`), are left out."""
    delta = {}
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0, 0.0))
        if calls > calls0 and name not in PROBE_COMMANDS:
            delta[name] = (calls - calls0, usec - usec0)
    return delta


class ServerProbe(Protocol):
    """What a CPU block reads from the server it runs against."""

    def cpu_s(self) -> float: ...

    def commands(self) -> CommandStats: ...


class RedisProbe:
    """A :class:`ServerProbe` of one Redis server, through its own client."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def cpu_s(self) -> float:
        return redis_cpu_s(self.client.info("cpu"))

    def commands(self) -> CommandStats:
        return command_stats(self.client.info("commandstats"))


def idle_cpu_rate(probe: ServerProbe, seconds: float) -> float:
    """The server's CPU seconds per second while nothing is sent to it for ``seconds``."""
    start, cpu = time.perf_counter(), probe.cpu_s()
    time.sleep(seconds)
    return (probe.cpu_s() - cpu) / (time.perf_counter() - start)


# --------------------------------------------------------------------------------- /proc


def parse_stat(text: str) -> tuple[int, int, int]:
    """``(pid, process group, CPU ticks)`` from a ``/proc/<pid>/stat`` line; the ticks are
    ``utime + stime + cutime + cstime`` (fields 14-17)."""
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    pid = int(head.split("(", 1)[0])
    return pid, int(fields[2]), sum(int(field) for field in fields[11:15])


def group_cpu_s(pgid: int, proc: Path = PROC) -> dict[int, float]:
    """CPU seconds of every live process of group ``pgid``, by pid."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pid, group, used = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not a process
        if group == pgid:
            found[pid] = used / ticks
    return found


def cpu_delta(before: Mapping[int, float], after: Mapping[int, float]) -> dict[int, float]:
    """CPU seconds each process used between two readings (a new process: all of its CPU;
    a process gone meanwhile is missing, its CPU lost unless its parent reaped it)."""
    return {pid: used - before.get(pid, 0.0) for pid, used in after.items()}


# --------------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class CpuBlock:
    """One block of ``calls`` calls of one arm: wall time, this process's CPU, the server's
    CPU and the server's time per command, all in seconds (commands in µs)."""

    calls: int
    wall_s: float
    client_s: float
    server_s: float
    commands: CommandStats

    def per_call_us(self, server_idle_rate: float = 0.0) -> dict[str, float]:
        """Client, server (minus ``server_idle_rate`` x wall time) and total CPU, and wall
        time, in µs per call."""
        server = self.server_s - server_idle_rate * self.wall_s
        scale = 1e6 / self.calls
        return {
            "client": self.client_s * scale,
            "server": server * scale,
            "total": (self.client_s + server) * scale,
            "wall": self.wall_s * scale,
        }


def cpu_block(fn: Callable[[], object], calls: int, probe: ServerProbe) -> CpuBlock:
    """Call ``fn`` ``calls`` times; what it cost this process and the server."""
    commands = probe.commands()
    server = probe.cpu_s()
    wall, client = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    client, wall = time.process_time() - client, time.perf_counter() - wall
    server = probe.cpu_s() - server
    return CpuBlock(calls, wall, client, server, command_delta(commands, probe.commands()))


def run_cpu_interleaved(
    arms: Mapping[str, Callable[[], object]],
    probe: ServerProbe,
    *,
    blocks: int,
    per_block: int,
    warmup: int = 0,
    before_block: Callable[[str], object] | None = None,
    on_block: Callable[[int, Mapping[str, CpuBlock]], None] | None = None,
) -> dict[str, list[CpuBlock]]:
    """:func:`cpu_block` of every arm in ``blocks`` alternating blocks (A B, B A, ...), after
    ``warmup`` uncounted calls of each; ``before_block(arm)`` runs before each block of
    ``arm``, uncounted."""
    names = list(arms)
    for name in names:
        for _ in range(warmup):
            arms[name]()
    out: dict[str, list[CpuBlock]] = {name: [] for name in names}
    for index in range(blocks):
        done = {}
        for name in names if index % 2 == 0 else names[::-1]:
            if before_block is not None:
                before_block(name)
            done[name] = cpu_block(arms[name], per_block, probe)
        for name in names:
            out[name].append(done[name])
        if on_block is not None:
            on_block(index, done)
    return out


def median_per_call(blocks: Sequence[CpuBlock], server_idle_rate: float = 0.0) -> dict[str, float]:
    """The median over ``blocks`` of each :meth:`CpuBlock.per_call_us` figure."""
    if not blocks:
        raise HarnessError("no CPU blocks")
    per_block = [block.per_call_us(server_idle_rate) for block in blocks]
    return {key: round(median([b[key] for b in per_block]), 1) for key in per_block[0]}


def top_commands(
    readings: Iterable[Mapping[str, tuple[int, float]]],
    per: float,
    *,
    top: int = 6,
    digits: int = 2,
) -> dict[str, float]:
    """Server µs spent in each command over all ``readings`` (``INFO commandstats`` deltas:
    name -> (calls, µs)) divided by ``per``, the ``top`` largest."""
    usec: dict[str, float] = {}
    for commands in readings:
        for name, (_, spent) in commands.items():
            usec[name] = usec.get(name, 0.0) + spent
    ranked = sorted(usec.items(), key=lambda item: -item[1])[:top]
    return {name: round(spent / per, digits) for name, spent in ranked}


def commands_per_call(blocks: Sequence[CpuBlock], top: int = 6) -> dict[str, float]:
    """Server µs per call spent in each command over all ``blocks``, the ``top`` largest."""
    calls = sum(block.calls for block in blocks)
    return top_commands((block.commands for block in blocks), calls, top=top)
