"""The README's ACL recipe, applied as written to a private Redis: the engine, the pool, the
operator's commands and the demo run as that user; a user that lacks a permission gets one
line naming it and exit status 2."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from agent_backend.client import AgentBackendClient
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.testing.fake_backend import FakeAgentBackend
from agent_sessions.testing.worker_process import WorkerProcess
from cache.records import SessionKey, SessionStatus
from tests import factories as f
from tests.integration.support import make_ctx, run_node, settings_env, wait_for
from tests.servers import Database, RedisServer
from workers.context import WorkerContext

README = Path(__file__).resolve().parents[2] / "README.md"
PASSWORD = "s3cret pass"
RECIPE_USER = "asc"


def readme_recipe() -> list[str]:
    """The README's ``redis-cli ACL SETUSER asc ...`` command as its words, the example
    password replaced."""
    text = README.read_text()
    found = re.search(r"^redis-cli (ACL SETUSER asc .*?)(?<!\\)$", text, re.M | re.S)
    assert found, "the README has no `redis-cli ACL SETUSER asc ...` recipe"
    words = shlex.split(found.group(1).replace("\\\n", " "))
    assert ">CHANGE-ME" in words
    return [f">{PASSWORD}" if word == ">CHANGE-ME" else word for word in words]


def user_url(server: RedisServer, user: str) -> str:
    return f"unix://{user}:{quote(PASSWORD)}@{server.socket_path}?db=0"


@pytest.fixture
def acl_redis() -> Iterator[RedisServer]:
    """A private Redis with the README's user, and users that each lack one permission."""
    with RedisServer() as server, server.client() as admin:
        admin.execute_command(*readme_recipe())
        for user, rules in LACKING.items():
            admin.execute_command("ACL", "SETUSER", user, "on", f">{PASSWORD}", *rules)
        yield server


LACKING = {
    "nochannels": ["resetkeys", "~asc:*", "~rq:*", "resetchannels", "+@all", "-@dangerous"],
    "nokeys": ["resetkeys", "~rq:*", "allchannels", "+@all", "-@dangerous"],
}


@pytest.fixture
def ctx(
    acl_redis: RedisServer, migrated: Database, fake: FakeAgentBackend
) -> Iterator[WorkerContext]:
    """A context that connects as the README's user."""
    yield make_ctx(user_url(acl_redis, RECIPE_USER), migrated.url, agent_backend_url=fake.url)


def cli(ctx: WorkerContext, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_sessions", *args],
        env=settings_env(ctx) | env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The last line of a command that succeeded (its JSON report)."""
    assert result.returncode == 0, result.stderr
    assert "NOPERM" not in result.stderr and "NoPermission" not in result.stderr, result.stderr
    return result.stdout.strip().splitlines()[-1]


def engine_loop(ctx: WorkerContext, backend: AgentBackendClient) -> list[SessionKey]:
    """Two Agent nodes, three loop iterations each: every entry after the first resumes."""
    lifecycle = SessionLifecycle(ctx)
    keys = []
    for node in ("node-a", "node-b"):
        for iteration in range(3):
            done = run_node(lifecycle, backend, f.scope(node=node, node_execution=f"x-{iteration}"))
            assert done.entry.resumable is (iteration > 0)
            assert done.result.metadata["session_snapshot_persisted"] is True
        keys.append(f.scope(node=node).key)
    return [key for key in keys if key is not None]


def test_the_readme_recipe_runs_the_engine_the_pool_the_commands_and_the_demo(
    ctx: WorkerContext,
    acl_redis: RedisServer,
    backend: AgentBackendClient,
    tmp_path: Path,
) -> None:
    keys = engine_loop(ctx, backend)
    with WorkerProcess(ctx.settings, 2, log=tmp_path / "pool.log") as pool:
        with _telling(pool):
            wait_for(lambda: all(ctx.repo.get(key) for key in keys), "the pool to flush", 60)
            SessionLifecycle(ctx).workflow_ended(f.TENANT, f.RUN, "succeeded")
            wait_for(lambda: _cleaned(ctx, keys), "the pool to clean the sessions up", 90)
        assert _workers_listening(ctx) == 2, "an RQ worker's pub/sub thread is not subscribed"
        stats = json.loads(ok(cli(ctx, "stats", "--json")))
        assert stats["dirty_total"] == 0 and len(stats["pool"]["workers"]) == 2
    log = pool.log.read_text()
    assert "NoPermission" not in log and "Traceback" not in log, log
    run = json.loads(ok(cli(ctx, "inspect", "run", f.TENANT, f.RUN, "--json")))
    assert run["run"]["state"] == "ended" and len(run["sessions"]) == 2
    ok(cli(ctx, "inspect", "session", *keys[0].parts(), "--json"))
    ctx.cache.save(f.session_key(run="run-2"), f.session_write())
    assert json.loads(ok(cli(ctx, "flush", "--wait", "--json")))["written"] == 1
    demo = ["--runs", "2", "--nodes", "2", "--iterations", "3", "--conversations", "2"]
    report = json.loads(ok(cli(ctx, "demo", *demo, "--turns", "3", "--json", TMPDIR=str(tmp_path))))
    assert report["verified"] is True and report["prefix"] == "asc-demo"


@contextmanager
def _telling(pool: WorkerProcess) -> Iterator[None]:
    """A wait that fails says what the pool logged."""
    try:
        yield
    except pytest.fail.Exception as exc:
        pytest.fail(f"{exc}\npool log:\n{pool.tail(60)}")


def _cleaned(ctx: WorkerContext, keys: list[SessionKey]) -> bool:
    rows = [ctx.repo.get(key) for key in keys]
    return all(row is not None and row.status is SessionStatus.CLEANED for row in rows)


def _workers_listening(ctx: WorkerContext) -> int:
    """How many RQ workers receive a command on their channel (0 for one that is not)."""
    from rq import Worker
    from rq.serializers import JSONSerializer

    workers = Worker.all(connection=ctx.queue_redis, serializer=JSONSerializer)
    return sum(int(ctx.queue_redis.pubsub_numsub(w.pubsub_channel_name)[0][1]) for w in workers)


@pytest.mark.parametrize(
    ("user", "args", "says"),
    [
        ("nochannels", ("worker", "-n", "1", "--burst"), "its ACL needs &rq:pubsub:*"),
        ("nokeys", ("worker", "-n", "1", "--burst"), "its ACL needs ~asc:* and ~rq:*"),
        ("nokeys", ("stats",), "its ACL needs ~asc:* and ~rq:*"),
        ("nokeys", ("flush",), "its ACL needs ~asc:* and ~rq:*"),
        (RECIPE_USER, ("demo", "--prefix", "other-demo"), "its ACL needs ~other-demo:* and ~rq:*"),
    ],
)
def test_a_permission_the_user_lacks_is_one_line_naming_it_and_exit_2(
    ctx: WorkerContext, acl_redis: RedisServer, user: str, args: tuple[str, ...], says: str
) -> None:
    """Before, exit status 1 and ``StoreUnavailable: ... Redis refused the command``, or
    (channels) a pool whose workers each logged a NoPermissionError traceback."""
    url = user_url(acl_redis, user)
    result = cli(ctx, *args, REDIS_URL=url, RQ_REDIS_URL=url, ASC_LOG_LEVEL="WARNING")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and says in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_the_recipe_gives_no_key_outside_its_patterns(acl_redis: RedisServer) -> None:
    """The user really is limited: another prefix's keys and FLUSHALL are refused."""
    with redis.Redis.from_url(user_url(acl_redis, RECIPE_USER)) as client:
        client.set("asc:probe", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("other:probe", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.flushall()
