"""Private Redis, Redis Cluster and PostgreSQL servers for tests and benchmarks.

Real processes, no Docker, no mocks.  Every server lives in its own temporary directory, is
ready when its constructor returns (polled with a deadline, never a fixed sleep), and is stopped
and its directory removed by ``close()`` (or by leaving a ``with`` block).  Servers still open
when the interpreter exits are closed by an ``atexit`` hook.

A server that cannot be started raises :class:`ServerError`: on this project that means a broken
machine (``make services`` installs what is missing), so callers must fail, never skip.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql
from psycopg.rows import TupleRow
from redis.cluster import ClusterNode

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class ServerError(RuntimeError):
    """A private server could not be started, stopped or reached."""


# --------------------------------------------------------------------------------- utilities


def require_binary(name: str, package: str) -> str:
    """Absolute path of ``name`` on PATH, or a ServerError telling how to install it."""
    path = shutil.which(name)
    if path is None:
        raise ServerError(
            f"`{name}` not found on PATH; run `make services` or `apt-get install -y {package}`"
        )
    return path


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
    """Poll ``predicate`` until it returns True; ServerError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not predicate():
        if time.monotonic() >= deadline:
            raise ServerError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that were free a moment ago (bound together, then released)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live process (zombies count as dead: nobody may reap them here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class _Closable(Protocol):
    def close(self) -> None: ...


_open_servers: set[_Closable] = set()


@atexit.register
def _close_leftovers() -> None:
    for server in list(_open_servers):
        with contextlib.suppress(Exception):
            server.close()


class _Server:
    """Context-manager and atexit bookkeeping shared by the server classes."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _spawn(argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session with stdout/stderr appended to ``log_path``."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _terminate(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _redis_pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return False  # refused, not listening yet, or still loading its data


def _wait_for_redis(
    proc: subprocess.Popen[bytes], client: redis.Redis, log: Path, what: str
) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with status {proc.returncode}:\n{_log_tail(log)}")
        return _redis_pings(client)

    wait_until(ready, what)


# --------------------------------------------------------------------------------- Redis


class RedisServer(_Server):
    """A private ``redis-server`` listening only on a unix socket in a temporary directory.

    ``extra_args`` are appended to the command line, e.g. ``["--maxmemory", "10mb"]`` or
    ``["--appendonly", "yes", "--appendfsync", "always"]`` (data then survives ``kill()`` +
    ``start()``, since the directory is kept until ``close()``).
    """

    def __init__(self, extra_args: Sequence[str] = (), *, start: bool = True) -> None:
        self._binary = require_binary("redis-server", "redis-server")
        self.dir = Path(tempfile.mkdtemp(prefix="asc-redis-", dir="/tmp"))  # short socket path
        self.socket_path = self.dir / "redis.sock"
        self.log_path = self.dir / "redis.log"
        self.extra_args = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        _open_servers.add(self)
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new client for this server (the caller closes it)."""
        return redis.Redis(unix_socket_path=str(self.socket_path), **kwargs)

    def start(self) -> None:
        if self.running:
            return
        argv = [
            self._binary,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        self._proc = _spawn(argv, self.log_path)
        with self.client(socket_connect_timeout=1, socket_timeout=1) as client:
            _wait_for_redis(self._proc, client, self.log_path, f"redis-server at {self.url}")

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM; with ``--save ''`` nothing is written)."""
        if self._proc is not None:
            _terminate(self._proc)

    def kill(self) -> None:
        """Crash it: SIGKILL, no shutdown work at all."""
        if self._proc is not None:
            _terminate(self._proc, signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        _open_servers.discard(self)


class RedisCluster(_Server):
    """A private Redis Cluster: ``masters`` primaries, no replicas, on free 127.0.0.1 ports.

    Each node gets an explicit ``--cluster-port`` (also free) so port+10000 never matters.
    """

    def __init__(self, masters: int = 3, extra_args: Sequence[str] = ()) -> None:
        self._binary = require_binary("redis-server", "redis-server")
        self._cli = require_binary("redis-cli", "redis-tools")
        self.dir = Path(tempfile.mkdtemp(prefix="asc-cluster-"))
        ports = free_ports(2 * masters)
        self.ports, self._bus_ports = ports[:masters], ports[masters:]
        self.extra_args = list(extra_args)
        self._procs: list[subprocess.Popen[bytes]] = []
        _open_servers.add(self)
        try:
            self._start_nodes()
            self._create_cluster()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    @property
    def startup_nodes(self) -> list[ClusterNode]:
        node: Callable[[str, int], ClusterNode] = ClusterNode  # redis-py leaves it unannotated
        return [node("127.0.0.1", port) for port in self.ports]

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """A new cluster client (the caller closes it)."""
        return redis.RedisCluster(startup_nodes=self.startup_nodes, **kwargs)

    def node_client(self, port: int) -> redis.Redis:
        """A plain client for one node (the caller closes it)."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def _start_nodes(self) -> None:
        for port, bus_port in zip(self.ports, self._bus_ports, strict=True):
            node_dir = self.dir / str(port)
            node_dir.mkdir()
            argv = [
                self._binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(node_dir),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "5000",
                "--cluster-port", str(bus_port),
                *self.extra_args,
            ]  # fmt: skip
            self._procs.append(_spawn(argv, node_dir / "redis.log"))
        for port, proc in zip(self.ports, self._procs, strict=True):
            with self.node_client(port) as client:
                _wait_for_redis(
                    proc, client, self.dir / str(port) / "redis.log", f"cluster node {port}"
                )

    def _create_cluster(self) -> None:
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        result = subprocess.run(
            [
                self._cli,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise ServerError(f"redis-cli --cluster create failed:\n{result.stdout}{result.stderr}")
        for port in self.ports:
            with self.node_client(port) as client:
                wait_until(
                    functools.partial(self._node_ready, client), f"cluster_state:ok on {port}"
                )

    def _node_ready(self, client: redis.Redis) -> bool:
        fields = cluster_info(client)
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_known_nodes") == str(len(self.ports))
            and fields.get("cluster_slots_ok") == "16384"
        )

    def stop(self) -> None:
        for proc in self._procs:
            _terminate(proc)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        _open_servers.discard(self)


def cluster_info(client: redis.Redis) -> dict[str, str]:
    """CLUSTER INFO of one node as a dict of strings (whatever redis-py's parsing does)."""
    info: object = client.cluster("INFO")
    if isinstance(info, dict):
        return {str(key): str(value) for key, value in info.items()}
    text = info.decode() if isinstance(info, bytes) else str(info)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


# --------------------------------------------------------------------------------- PostgreSQL


def pg_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb and pg_ctl."""
    candidates = []
    for path in glob.glob("/usr/lib/postgresql/*/bin"):
        version = Path(path).parent.name
        if version.isdigit() and (Path(path) / "initdb").exists():
            candidates.append((int(version), Path(path)))
    if candidates:
        return max(candidates)[1]
    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(initdb).parent
    raise ServerError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin; "
        "run `make services` or `apt-get install -y postgresql`"
    )


def _as_postgres(argv: Sequence[str]) -> list[str]:
    """Postgres refuses to run as root: as root, run the command as the ``postgres`` user."""
    if os.geteuid() != 0:
        return list(argv)
    return ["runuser", "-u", "postgres", "--", *argv]


def _give_to_postgres(path: Path) -> None:
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError(
            "running as root but there is no `postgres` OS user to run PostgreSQL as; "
            "`apt-get install -y postgresql` creates it"
        ) from None
    os.chown(path, user.pw_uid, user.pw_gid)


class PostgresServer(_Server):
    """A private PostgreSQL cluster (trust auth, fsync off) on a free 127.0.0.1 port.

    Commits are still synchronous, so a committed row survives ``kill()``.

    ``stop()`` is a fast shutdown, ``kill()`` a crash (SIGKILL to the whole postmaster process
    group); ``start()`` brings it back on the same port with the same data.
    """

    def __init__(self, *, user: str = "postgres", start: bool = True) -> None:
        self.bin = pg_bin_dir()
        self.user = user
        # Under /tmp, mode 0755 and owned by postgres: the postgres user can reach and write it.
        self.dir = Path(tempfile.mkdtemp(prefix="asc-pg-", dir="/tmp"))
        self.dir.chmod(0o755)
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.port = free_port()
        _open_servers.add(self)
        try:
            _give_to_postgres(self.dir)
            initdb = [
                str(self.bin / "initdb"),
                "-D", str(self.data),
                "-A", "trust",
                "-U", user,
                "-E", "UTF8",
                "--no-locale",
                "--no-sync",
            ]  # fmt: skip
            self._run(initdb, "initdb")
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    @property
    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    @property
    def running(self) -> bool:
        return self.postmaster_pid is not None

    def _run(self, argv: Sequence[str], what: str) -> None:
        result = subprocess.run(
            _as_postgres(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT * 2,
            check=False,
        )
        if result.returncode != 0:
            raise ServerError(
                f"{what} failed ({result.returncode}):\n{result.stdout}{result.stderr}\n"
                f"{_log_tail(self.log_path)}"
            )

    def start(self) -> None:
        if self.running:
            return
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.dir}"
            " -c fsync=off"  # survives process crashes (kill()), not OS crashes: fine for tests
        )
        pg_ctl = [
            str(self.bin / "pg_ctl"),
            "-D", str(self.data),
            "-l", str(self.log_path),
            "-w", "-t", str(int(START_TIMEOUT)),
            "-o", options,
            "start",
        ]  # fmt: skip
        self._run(pg_ctl, "pg_ctl start")
        wait_until(lambda: pg_answers(self.url), f"PostgreSQL at {self.url}")

    def stop(self) -> None:
        """Fast shutdown: disconnect clients, checkpoint, exit."""
        if self.running:
            self._run(
                [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                "pg_ctl stop",
            )

    def kill(self) -> None:
        """Crash it: SIGKILL the postmaster and its backends; the next start() does recovery."""
        pid = self.postmaster_pid
        if pid is None:
            return
        try:  # pg_ctl starts the postmaster in its own session, backends share its group
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_until(lambda: not pid_alive(pid), f"postmaster {pid} to die", STOP_TIMEOUT)
        # A dead postmaster nobody reaps (no init reaping orphans, as in some containers) stays a
        # zombie whose pid still "exists"; Postgres would take its stale lock files for a live
        # server, so remove them (what it would do itself once the pid is really gone).
        for lock in (self.data / "postmaster.pid", self.dir / f".s.PGSQL.{self.port}.lock"):
            lock.unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        with contextlib.suppress(ServerError):
            self.stop()
        if self.running:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        _open_servers.discard(self)


# --------------------------------------------------------------------------------- databases


@dataclass(frozen=True)
class Database:
    """One database, addressed two ways."""

    name: str
    url: str  # postgresql://…  — libpq / psycopg
    sqlalchemy_url: str  # postgresql+psycopg://…  — SQLAlchemy / Alembic


def plain_url(url: str) -> str:
    """``postgresql+psycopg://…`` (or ``postgres://``) → ``postgresql://…``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql"))


def with_database(url: str, name: str) -> str:
    """The same server and credentials, another database."""
    return urlunsplit(urlsplit(plain_url(url))._replace(path=f"/{name}"))


def sqlalchemy_url(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(scheme="postgresql+psycopg"))


def pg_answers(url: str, timeout: int = 3) -> bool:
    """True if the server of ``url`` accepts a connection to its ``postgres`` database."""
    try:
        with psycopg.connect(with_database(url, "postgres"), connect_timeout=timeout) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


def _maintenance(server_url: str) -> psycopg.Connection[TupleRow]:
    return psycopg.connect(with_database(server_url, "postgres"), autocommit=True)


def create_database(server_url: str, name: str, template: str | None = None) -> Database:
    """CREATE DATABASE ``name`` (a copy of ``template`` if given) on the server of the URL."""
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with _maintenance(server_url) as conn:
        conn.execute(query)
    url = with_database(server_url, name)
    return Database(name=name, url=url, sqlalchemy_url=sqlalchemy_url(url))


def drop_database(server_url: str, name: str) -> None:
    """DROP DATABASE IF EXISTS ``name`` WITH (FORCE) — disconnects whoever still uses it."""
    with _maintenance(server_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def database_exists(server_url: str, name: str) -> bool:
    with _maintenance(server_url) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None


@contextlib.contextmanager
def fresh_database(
    server_url: str, *, template: str | None = None, prefix: str = "asc_test_"
) -> Iterator[Database]:
    """A new uniquely named database (``asc_test_<hex>``), dropped on exit."""
    name = f"{prefix}{secrets.token_hex(6)}"
    database = create_database(server_url, name, template)
    try:
        yield database
    finally:
        drop_database(server_url, name)
