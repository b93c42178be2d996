"""Every input has a contract: a typed error at the door with nothing written, or an exact
round trip Redis -> Postgres -> backend request (issue #8 of the design notes).

The table covers every input the landed code accepted and could never land (or escaped as an
untyped error); the hypothesis fuzz throws ids and JSON-like states at the public API,
surrogates, NUL, deep nesting, huge integers and non-finite floats included.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_backend.answer import Answer, decode
from agent_backend.errors import BackendValidationError
from agent_backend.models import (
    CreateRunRequest,
    RunComposition,
    RunStatusResponse,
    decode_status,
    encode_json,
)
from agent_sessions.lifecycle import SessionLifecycle
from agent_sessions.outcomes import Entry, NodeResult, RunOutcome
from cache.codec import check_specs
from cache.errors import AgentSessionsError, InvalidId, InvalidInput, InvalidSnapshot
from cache.records import LayerSpec, LifecycleState, Scope, Snapshot, SnapshotLayer
from cache.validate import MAX_JSON_DEPTH
from tests import factories as f
from tests.integration.support import make_ctx, node_composition, row_count
from tests.servers import Database
from workers.context import WorkerContext
from workers.flush import flush_session

REQUEST = CreateRunRequest(composition=node_composition())
SUSPENDED = LifecycleState.SUSPENDED


def nested(depth: int) -> object:
    """A list nested ``depth`` deep, built without recursion."""
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def state_snapshot(state: object) -> Snapshot:
    return Snapshot((SnapshotLayer("history", SUSPENDED, {"v": state}),))


def spec_with(config: object = None, metadata: dict[str, Any] | None = None) -> LayerSpec:
    return LayerSpec("history", "pydantic_ai.history", {}, metadata or {}, config)  # type: ignore[arg-type]


@pytest.fixture
def ctx(redis_client: redis.Redis, redis_url: str, migrated: Database) -> WorkerContext:
    return make_ctx(redis_url, migrated.url)


@pytest.fixture
def lc(ctx: WorkerContext) -> SessionLifecycle:
    return SessionLifecycle(ctx)


def written(ctx: WorkerContext) -> tuple[set[bytes], int]:
    """Every Redis key but the layout marker, and the number of Postgres rows."""
    keys = {k for k in ctx.cache.client.keys("*") if k != b"asc:meta"}  # type: ignore[union-attr]
    return keys, row_count(ctx.repo)


def save_state(lc: SessionLifecycle, state: object) -> NodeResult:
    outcome = RunOutcome("succeeded", "run-x", REQUEST, state_snapshot(state))
    return lc.finish(f.scope(), Entry(version=0), outcome)


def answer(state_json: str) -> bytes:
    """The backend's JSON answer: a terminal status whose history layer holds ``state_json``."""
    return (
        '{"run_id": "r1", "status": "succeeded", "created_at": "2026-01-01T00:00:00Z", '
        '"updated_at": "2026-01-01T00:00:00Z", "session_snapshot": {"layers": [{"name": '
        f'"history", "lifecycle_state": "suspended", "runtime_state": {{"v": {state_json}}}}}]}}}}'
    ).encode()


NUL_RUN_ID = answer("1").replace(b'"r1"', b'"r\\u0000"')


def decoded_by_the_client(body: bytes) -> RunStatusResponse:
    return decode(RunStatusResponse, Answer(200, body), decode_status)


def finish_answer(lc: SessionLifecycle, body: bytes) -> NodeResult:
    outcome = RunOutcome.from_status(REQUEST, decoded_by_the_client(body))
    return lc.finish(f.scope(), Entry(version=0), outcome)


def send_spec(lc: SessionLifecycle, spec: LayerSpec) -> object:
    """Specs reach the door when a request is built with them (they go to the backend)."""
    return lc.build_request(f.scope(), Entry(), RunComposition(layers=[spec]))


Call = Callable[[SessionLifecycle], object]
RAISED: list[tuple[str, type[AgentSessionsError], Call]] = [
    ("NUL in an id", InvalidId, lambda lc: lc.enter(f.scope(node="node\x00x"))),
    ("NUL in a run id", InvalidId, lambda lc: lc.workflow_ended("t", "run\x00", "succeeded")),
    ("lone surrogate in an id", InvalidId, lambda lc: lc.enter(f.scope(agent="a\ud800"))),
    ("NaN in a spec config", InvalidSnapshot, lambda lc: send_spec(lc, spec_with(math.nan))),
    (
        "inf in spec metadata",
        InvalidSnapshot,
        lambda lc: send_spec(lc, spec_with(metadata={"x": math.inf})),
    ),
    ("-inf in spec config", InvalidSnapshot, lambda lc: send_spec(lc, spec_with([-math.inf]))),
    ("NUL in a spec string", InvalidSnapshot, lambda lc: send_spec(lc, spec_with({"t": "\x00"}))),
    ("NUL in a spec key", InvalidSnapshot, lambda lc: send_spec(lc, spec_with({"a\x00": 1}))),
    ("a surrogate in a spec", InvalidSnapshot, lambda lc: send_spec(lc, spec_with("\udfff"))),
    (
        "NaN in a backend answer",
        BackendValidationError,
        lambda lc: decoded_by_the_client(answer("NaN")),
    ),
    (
        "nesting 5,000 in a backend answer",
        BackendValidationError,
        lambda lc: decoded_by_the_client(answer("[" * 5000 + "]" * 5000)),
    ),
    (
        'expected_version="1"',
        InvalidInput,
        lambda lc: lc.ctx.cache.save(f.session_key(), f.session_write(), expected_version="1"),  # type: ignore[arg-type]
    ),
    (
        "expected_version=True",
        InvalidInput,
        lambda lc: lc.ctx.cache.save(f.session_key(), f.session_write(), expected_version=True),
    ),
    (
        'entry.version="1"',
        InvalidInput,
        lambda lc: lc.finish(
            f.scope(),
            Entry(version="1"),  # type: ignore[arg-type]
            RunOutcome("succeeded", "r", REQUEST, f.snapshot()),
        ),
    ),
    (
        "an unknown outcome status",
        InvalidInput,
        lambda lc: lc.finish(f.scope(), Entry(), RunOutcome("weird", "r", REQUEST, f.snapshot())),  # type: ignore[arg-type]
    ),
    ("a dict as the scope", InvalidInput, lambda lc: lc.enter({"tenant_id": "t"})),  # type: ignore[arg-type]
    (
        "attempt=-1",
        InvalidInput,
        lambda lc: lc.build_request(f.scope(), Entry(), node_composition(), -1),
    ),
    (
        "an object in request metadata",
        InvalidInput,
        lambda lc: lc.build_request(
            f.scope(), Entry(), node_composition(), metadata={"x": object()}
        ),
    ),
    (
        "a list as request metadata",
        InvalidInput,
        lambda lc: lc.build_request(f.scope(), Entry(), node_composition(), metadata=["x"]),  # type: ignore[arg-type]
    ),
    (
        "a lone surrogate in request metadata",
        InvalidInput,
        lambda lc: lc.build_request(
            f.scope(), Entry(), node_composition(), metadata={"note": "x\ud800"}
        ),
    ),
]
"""Refused by raising a typed error: the caller handed in something the contract excludes."""

REPORTED: list[tuple[str, Call]] = [
    ("NaN in snapshot state", lambda lc: save_state(lc, math.nan)),
    ("inf in snapshot state", lambda lc: save_state(lc, {"x": math.inf})),
    ("surrogate in state", lambda lc: save_state(lc, "x\udfff")),
    ("surrogate in a state key", lambda lc: save_state(lc, {"\ud800": 1})),
    ("nesting 256", lambda lc: save_state(lc, nested(256))),
    ("nesting 999", lambda lc: save_state(lc, nested(999))),
    ("nesting 100,000", lambda lc: save_state(lc, nested(100_000))),
    ("a tuple in state", lambda lc: save_state(lc, (1, 2))),
    ("a set in state", lambda lc: save_state(lc, {1, 2})),
    ("a non-string key", lambda lc: save_state(lc, {1: "a"})),
    (
        "nesting 150 in a backend answer",
        lambda lc: finish_answer(lc, answer(json.dumps(nested(150)))),
    ),
    (
        "a NUL in a backend run id",
        lambda lc: finish_answer(lc, answer("1").replace(b'"r1"', b'"r\\u0000"')),
    ),
]
"""Refused by ``finish`` with the error in ``metadata``: what a run produced that the store
cannot hold never breaks the node."""


@pytest.mark.parametrize(("row", "error", "call"), RAISED, ids=[row for row, _, _ in RAISED])
def test_bad_input_is_refused_typed_at_the_door_with_nothing_written(
    ctx: WorkerContext,
    lc: SessionLifecycle,
    row: str,
    error: type[AgentSessionsError],
    call: Callable[[SessionLifecycle], object],
) -> None:
    before = written(ctx)
    with pytest.raises(error) as refused:
        call(lc)
    assert isinstance(refused.value, AgentSessionsError)
    assert written(ctx) == before


def test_request_metadata_any_mapping_is_sent_under_the_scopes_ids(lc: SessionLifecycle) -> None:
    scope = f.scope()
    caller = OrderedDict([("trace", "t-1"), ("tenant_id", object()), ("node_id", "spoofed")])
    request = lc.build_request(scope, Entry(), node_composition(), metadata=caller)
    assert request.metadata["trace"] == "t-1"
    assert request.metadata["tenant_id"] == scope.tenant_id  # the scope's IDs win, unchecked
    assert request.metadata["node_id"] == scope.node_id
    assert json.loads(encode_json(request))["metadata"]["trace"] == "t-1"


@pytest.mark.parametrize(("row", "call"), REPORTED, ids=[row for row, _ in REPORTED])
def test_what_a_run_produced_that_cannot_be_stored_is_reported_with_nothing_written(
    ctx: WorkerContext, lc: SessionLifecycle, row: str, call: Call
) -> None:
    before = written(ctx)
    result = call(lc)
    assert isinstance(result, NodeResult) and result.status == "completed"
    assert result.metadata["session_snapshot_persisted"] is False, result.metadata
    assert result.metadata["session_store_error_type"] in ("InvalidSnapshot", "InvalidId")
    assert written(ctx) == before


@pytest.mark.parametrize(
    "call",
    [lambda lc: save_state(lc, 2**64), lambda lc: finish_answer(lc, answer(str(2**64)))],
    ids=["python-state", "backend-answer"],
)
def test_an_integer_beyond_64_bits_is_stored_and_resumed_as_json_holds_it(
    lc: SessionLifecycle, call: Call
) -> None:
    """A snapshot is stored as JSON text, which holds any integer (the backend's JSON does)."""
    result = call(lc)
    assert isinstance(result, NodeResult) and result.metadata["session_snapshot_persisted"]
    entry = lc.enter(f.scope())
    assert entry.snapshot is not None
    assert 2**64 in entry.snapshot.decoded().layers[0].runtime_state.values()


def test_a_backend_run_id_the_store_refuses_is_reported_and_never_breaks_the_node(
    ctx: WorkerContext, lc: SessionLifecycle
) -> None:
    """Data from the backend that cannot be stored is a metadata report, not an exception."""
    outcome = RunOutcome("succeeded", "run\x00id", REQUEST, f.snapshot())
    result = lc.finish(f.scope(), Entry(version=0), outcome)
    assert result.status == "completed"
    assert result.metadata["session_snapshot_persisted"] is False
    assert "backend_run_id" in str(result.metadata["session_store_error_detail"])
    assert written(ctx)[1] == 0


# --------------------------------------------------------------------------- the fuzz

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
ANY_CHAR = st.one_of(st.characters(), SURROGATES, st.just("\x00"))
TEXT = st.text(ANY_CHAR, max_size=12)
IDS = st.text(ANY_CHAR, min_size=0, max_size=300)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=20,
)
DEEP = st.integers(min_value=MAX_JSON_DEPTH - 3, max_value=MAX_JSON_DEPTH + 3).map(nested)


def round_trip(
    ctx: WorkerContext, lc: SessionLifecycle, scope: Scope, state: object, config: object
) -> None:
    """Save, flush, read back from Redis and Postgres, build the next backend request; or,
    if the store refuses the state, nothing written anywhere."""
    snapshot = state_snapshot(state)
    spec = LayerSpec(name="history", type="pydantic_ai.history", config=config)
    request = CreateRunRequest(composition=RunComposition(layers=[spec]))
    result = lc.finish(scope, Entry(version=0), RunOutcome("succeeded", "r", request, snapshot))
    if result.metadata["session_snapshot_persisted"] is False:
        assert result.metadata["session_store_error_type"] == "InvalidSnapshot", result.metadata
        assert written(ctx)[1] == 0 and not ctx.cache.client.keys("*:session:*")
        return
    assert scope.key is not None
    assert flush_session(ctx.cache, ctx.repo, scope.key)
    row, cached = ctx.repo.get(scope.key), ctx.cache.load(scope.key).record
    assert row is not None and cached is not None
    assert row.snapshot == cached.snapshot == snapshot
    assert row.layer_specs[0].config == config == cached.layer_specs[0].config
    entry = lc.enter(scope)
    sent = lc.build_request(scope, entry, node_composition())
    wire = msgspec.json.decode(encode_json(sent))["session_snapshot"]["layers"]
    history = [layer["runtime_state"] for layer in wire if layer["name"] == "history"]
    assert history == [{"v": state}]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(node=IDS, state=st.one_of(JSONISH, DEEP))
def test_fuzzed_ids_and_states_round_trip_exactly_or_are_refused_with_nothing_written(
    ctx: WorkerContext, lc: SessionLifecycle, migrated: Database, node: str, state: object
) -> None:
    ctx.cache.client.flushall()
    with psycopg.connect(migrated.url, autocommit=True) as conn:
        conn.execute("TRUNCATE agent_runtime_sessions, agent_session_owners")
    try:
        scope = f.scope(node=node)
    except InvalidInput:
        assert written(ctx) == (set(), 0)
        return
    try:  # specs are stricter than states: Postgres stores them as text (no NUL)
        check_specs([spec_with(config={"v": state})])
        config: object = {"v": state}
    except InvalidSnapshot:
        config = None
    round_trip(ctx, lc, scope, state, config)
