"""The benchmarks' realistic agent state: its size, shape, determinism and change per iteration."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from bench.__main__ import BENCHMARKS, SNAPSHOT
from bench.agent_state import (
    DEFAULT_SNAPSHOT,
    LAYER_NAMES,
    SNAPSHOT_KINDS,
    WINDOW,
    agent_states,
    realistic_specs,
    realistic_state,
)
from cache.codec import pack
from cache.snapshot_json import RawSnapshot, decode, encode_checked

ITERATIONS = range(0, 300, 7)


def containers(value: Any) -> int:
    """Dicts and lists in a decoded msgpack value, itself included."""
    if isinstance(value, dict):
        return 1 + sum(containers(item) for item in value.values())
    if isinstance(value, list):
        return 1 + sum(containers(item) for item in value)
    return 0


def scalars(value: Any) -> set[type]:
    """The types of every non-container value inside ``value``."""
    if isinstance(value, dict):
        return set().union(*(scalars(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(scalars(item) for item in value))
    return {type(value)}


def strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [*value, *(s for item in value.values() for s in strings(item))]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize("n", ITERATIONS)
def test_size_and_container_count_stay_in_their_bands(n: int) -> None:
    encoded = pack(realistic_state(n))
    assert 7 * 1024 <= len(encoded) <= 9 * 1024
    assert 150 <= containers(msgspec.msgpack.decode(encoded)) <= 250


def test_the_state_has_the_layers_of_a_real_agent() -> None:
    snapshot = realistic_state(5)
    assert snapshot.layer_names() == LAYER_NAMES
    assert tuple(spec.name for spec in realistic_specs()) == LAYER_NAMES
    history = snapshot.layers[LAYER_NAMES.index("history")].runtime_state
    roles = [message["role"] for message in history["messages"]]
    assert len(roles) == WINDOW and set(roles) == {"user", "assistant", "tool"}
    assert any("tool_calls" in message for message in history["messages"])


def test_values_mix_scalar_types_and_non_ascii_text() -> None:
    decoded = msgspec.msgpack.decode(pack(realistic_state(3)))
    assert {int, float, bool, type(None), str} <= scalars(decoded)
    assert any(not text.isascii() for text in strings(decoded))


def test_the_same_seed_and_iteration_give_the_same_bytes() -> None:
    assert pack(realistic_state(42, seed=3)) == pack(realistic_state(42, seed=3))
    assert pack(realistic_state(42, seed=3)) != pack(realistic_state(42, seed=4))
    assert agent_states(count=4).snapshots == agent_states(count=4).snapshots


def test_every_iteration_changes_the_state_as_a_loop_would() -> None:
    states = [realistic_state(n) for n in range(40)]
    encoded = [pack(state) for state in states]
    assert len(set(encoded)) == len(encoded)
    before, after = (s.layers[LAYER_NAMES.index("history")].runtime_state for s in states[:2])
    assert after["messages"][:-1] == before["messages"][1:]  # one appended, the oldest dropped
    assert after["dropped"] == before["dropped"] + 1


@pytest.mark.parametrize("n", [0, 17])
def test_the_state_round_trips_through_the_codec_and_passes_the_door(n: int) -> None:
    snapshot = realistic_state(n)
    encoded = encode_checked(snapshot, 1 << 20)
    assert decode(encoded) == snapshot
    wire = msgspec.json.decode(msgspec.json.encode(snapshot), type=RawSnapshot)
    assert encode_checked(wire, 1 << 20) == msgspec.json.encode(wire)


def test_agent_states_by_kind() -> None:
    realistic = agent_states(count=3)
    assert (realistic.kind, len(realistic.snapshots), realistic.variant) == ("realistic", 3, None)
    assert realistic.facts()["snapshot"] == "realistic" and "variant" not in realistic.facts()
    small = agent_states("small")
    assert (len(small.snapshots), small.variant) == (1, "--snapshot small")
    assert small.facts()["variant"] == "--snapshot small"
    with pytest.raises(ValueError, match="snapshot must be one of"):
        agent_states("huge")


def test_the_snapshot_option_is_declared_where_the_states_are_used() -> None:
    assert SNAPSHOT.choices == SNAPSHOT_KINDS and SNAPSHOT_KINDS[0] == DEFAULT_SNAPSHOT
    users = {name for name, benchmark in BENCHMARKS.items() if SNAPSHOT in benchmark.options}
    assert users == {
        "hot_path",
        "loop_vs_postgres",
        "conversation_turns",
        "parallel_loops",
        "cpu_per_iteration",
        "flush_cpu",
        "scale",
    }
