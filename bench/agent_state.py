"""The agent states the loop benchmarks save: a realistic one (the default) or the small one.

**realistic**: what a tool-using agent's snapshot looks like a dozen turns into a loop. Six
layers (``prompt``: system template, variables and retrieved documents; ``execution``: the
workflow context, the loop's counters, inputs, budget and a trace; ``history``: a rolling
window of :data:`WINDOW` messages, user text, assistant tool calls with nested arguments, tool
results with nested data, assistant answers; ``memory``: facts, entities, episodes;
``plan``: a small task tree; ``output``: the last answer with citations and structured data),
7-9 KB of msgpack in 150-250 containers, with ints, floats, bools, ``None`` and non-ASCII
text. :func:`realistic_state` ``(n)`` is iteration ``n``'s state, a pure function of the
seed and ``n``: each iteration appends a message and drops the oldest, bumps the loop's
counters, rewrites one memory fact, moves the plan on and replaces the output, so
consecutive states differ while the size stays in the band.

**small**: ``bench.hot_path.build_snapshot``, the ~8 KB four-layer snapshot the benchmarks
saved before (few containers, long strings), the same every iteration.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Final

from cache.codec import pack
from cache.records import LayerSpec, LifecycleState, Snapshot, SnapshotLayer

REALISTIC: Final = "realistic"
SMALL: Final = "small"
SNAPSHOT_KINDS: Final = (REALISTIC, SMALL)
DEFAULT_SNAPSHOT: Final = REALISTIC
WINDOW: Final = 12
"""Messages in the history layer's rolling window (a multiple of the four message kinds)."""
CYCLE: Final = 32
"""Distinct consecutive states a benchmark cycles through (built before timing)."""
LAYER_NAMES: Final = ("prompt", "execution", "history", "memory", "plan", "output")
_KINDS: Final = ("user", "tool_call", "tool_result", "answer")
_WORDS: Final = (
    "the", "agent", "calls", "a", "tool", "and", "reads", "its", "result", "before", "order",
    "status", "invoice", "refund", "shipping", "date", "warehouse", "customer", "summary",
    "next", "step", "carrier", "delay", "parcel", "address", "payment", "confirmed",
    "café", "Straße", "naïve", "déjà", "München", "São", "Paulo", "façade", "Zürich",
    "注文", "配送", "東京", "顧客", "заказ", "доставка", "Москва", "🙂", "✓", "€",
)  # fmt: skip
_TOOLS: Final = ("lookup_order", "track_parcel", "search_kb", "issue_refund")
_STATUSES: Final = ("pending", "running", "done", "blocked")


def _text(rng: random.Random, low: int, high: int) -> str:
    """Words drawn from :data:`_WORDS`, ``low``-``high`` characters long."""
    length = rng.randint(low, high)
    words: list[str] = []
    size = 0
    while size < length:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:length]


def _rng(seed: int, *parts: object) -> random.Random:
    """A generator of its own for one part of one state (string seeds are reproducible)."""
    return random.Random(":".join(str(part) for part in (seed, *parts)))


def _stamp(i: int) -> str:
    return f"2026-03-14T{9 + i // 3600 % 12:02d}:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z"


# --------------------------------------------------------------------------------- history


def _tool_call(rng: random.Random, i: int) -> dict[str, Any]:
    tool = _TOOLS[i // 4 % len(_TOOLS)]
    return {
        "id": f"call_{i:06d}",
        "type": "function",
        "name": tool,
        "args": {
            "order_id": f"ORD-{rng.randint(10_000, 99_999)}",
            "fields": ["status", "eta", "items"][: rng.randint(1, 3)],
            "options": {"locale": rng.choice(["de-DE", "ja-JP", "pt-BR"]), "verbose": False},
            "filters": {"since": _stamp(i // 2), "carrier": None},
        },
    }


def _tool_result(rng: random.Random, i: int) -> dict[str, Any]:
    items = [
        {"sku": f"SKU-{rng.randint(100, 999)}", "qty": rng.randint(1, 4), "price": 19.5 + k}
        for k in range(3)
    ]
    return {
        "tool_call_id": f"call_{i - 1:06d}",
        "name": _TOOLS[i // 4 % len(_TOOLS)],
        "content": {
            "ok": True,
            "data": {"status": rng.choice(_STATUSES), "eta_days": rng.randint(1, 9)},
            "items": items,
            "note": _text(rng, 30, 60),
            "error": None,
        },
        "elapsed_ms": round(rng.uniform(20, 900), 1),
    }


def _message(seed: int, i: int) -> dict[str, Any]:
    """Message ``i`` of the conversation (the same whichever state's window holds it)."""
    rng = _rng(seed, "message", i)
    kind = _KINDS[i % len(_KINDS)]
    base: dict[str, Any] = {"role": "assistant", "timestamp": _stamp(i), "tokens": 0}
    meta = {"model": "gpt-x", "latency_ms": rng.randint(80, 2400), "cached": i % 3 == 0}
    if kind == "user":
        base |= {"role": "user", "content": _text(rng, 80, 170), "attachments": []}
    elif kind == "tool_call":
        base |= {"content": None, "tool_calls": [_tool_call(rng, i)]}
    elif kind == "tool_result":
        base |= {"role": "tool", **_tool_result(rng, i)}
    else:
        cited = [f"doc-{rng.randint(1, 40)}" for _ in range(2)]
        base |= {"content": _text(rng, 170, 280), "citations": cited, "finish": "stop"}
    base["tokens"] = rng.randint(20, 400)
    base["meta"] = meta
    return base


def _history(seed: int, n: int) -> dict[str, Any]:
    messages = [_message(seed, i) for i in range(n, n + WINDOW)]
    tokens = sum(int(m["tokens"]) for m in messages)
    return {
        "messages": messages,
        "dropped": n,
        "usage": {"input_tokens": 3_000 + 37 * n, "output_tokens": 1_200 + 11 * n, "calls": n},
        "window_tokens": tokens,
        "truncated": n > 0,
    }


# --------------------------------------------------------------------------------- other layers


def _prompt(seed: int) -> dict[str, Any]:
    rng = _rng(seed, "prompt")
    documents = [
        {
            "id": f"doc-{k}",
            "title": _text(rng, 20, 40),
            "score": round(rng.uniform(0.5, 0.99), 4),
            "snippet": _text(rng, 60, 110),
            "source": {"kind": "kb", "uri": f"kb://support/{k}", "stale": k == 2},
        }
        for k in range(3)
    ]
    return {
        "template": _text(rng, 180, 240),
        "variables": {"customer": "Zoë Müller-Øberg", "tier": "gold", "since_year": 2019},
        "documents": documents,
        "model_params": {"temperature": 0.2, "top_p": 0.95, "max_tokens": 1024, "seed": None},
        "stop": ["</answer>", "\n\nUser:"],
    }


def _execution(seed: int, n: int) -> dict[str, Any]:
    rng = _rng(seed, "execution", n)
    trace = [
        {"span": f"node-{n}-{k}", "ms": round(rng.uniform(1, 400), 2), "ok": k != 3, "attrs": {}}
        for k in range(4)
    ]
    return {
        "workflow": {"run": f"run-{seed}", "node": "agent_loop", "attempt": 0, "parent": None},
        "loop": {"index": n, "max": 500, "started_at": _stamp(0), "last_at": _stamp(n)},
        "inputs": {
            "query": _text(_rng(seed, "query"), 60, 100),
            "attachments": [{"name": "facture_été.pdf", "bytes": 48_213, "mime": "pdf"}],
        },
        "budget": {"tokens_used": 4_000 + 48 * n, "limit": 200_000, "cost_usd": 0.0031 * n},
        "permissions": {"tools": list(_TOOLS), "network": True, "write": False},
        "trace": trace,
    }


def _memory(seed: int, n: int) -> dict[str, Any]:
    rng = _rng(seed, "memory")
    facts = [
        {"key": f"fact-{k}", "value": _text(rng, 25, 50), "confidence": 0.8, "from": [k]}
        for k in range(8)
    ]
    slot = n % len(facts)
    fresh = _rng(seed, "fact", n)
    value = _text(fresh, 25, 50)
    facts[slot] = {"key": f"fact-{slot}", "value": value, "confidence": 0.95, "from": [n, slot]}
    entities = {
        name: {"type": kind, "aliases": [name.lower()], "attrs": {"seen": 1 + k, "vip": k == 0}}
        for k, (name, kind) in enumerate(
            [("Zoë", "person"), ("ORD-48213", "order"), ("DHL", "carrier"), ("東京", "city")]
        )
    }
    episodes = [
        {"turn": n - k, "summary": _text(_rng(seed, "episode", n - k), 30, 55), "tags": ["order"]}
        for k in range(3)
    ]
    return {
        "facts": facts,
        "entities": entities,
        "episodes": episodes,
        "preferences": {"language": "de", "tone": "formal", "units": "metric", "emoji": False},
        "updates": n,
    }


def _plan(n: int) -> dict[str, Any]:
    done = n % 7

    def leaf(k: int) -> dict[str, Any]:
        return {"id": f"s{k}", "status": _STATUSES[2] if k < done else _STATUSES[0], "sub": []}

    steps = [
        {"id": f"p{g}", "status": _STATUSES[1], "after": [f"p{g - 1}"] if g else [], "sub": subs}
        for g, subs in enumerate([leaf(2 * g), leaf(2 * g + 1)] for g in range(3))
    ]
    return {
        "goal": "resolve the customer's delayed order — Lieferung verspätet",
        "root": {"id": "root", "status": _STATUSES[1], "sub": steps},
        "cursor": [f"p{done // 2 % 3}", f"s{done % 6}"],
        "revision": n // 5,
    }


def _output(seed: int, n: int) -> dict[str, Any]:
    rng = _rng(seed, "output", n)
    return {
        "answer": _text(rng, 100, 160),
        "citations": [{"doc": f"doc-{k}", "span": [k * 10, k * 10 + 42]} for k in range(3)],
        "structured": {
            "order": {"id": "ORD-48213", "status": rng.choice(_STATUSES), "eta_days": n % 9},
            "refund": None,
        },
        "confidence": round(rng.uniform(0.6, 0.99), 3),
        "needs_human": False,
    }


# --------------------------------------------------------------------------------- states


def realistic_state(n: int, seed: int = 7) -> Snapshot:
    """Iteration ``n``'s state (``n >= 0``): the same for the same ``seed`` and ``n``."""
    suspended = LifecycleState.SUSPENDED
    states = (
        _prompt(seed),
        _execution(seed, n),
        _history(seed, n),
        _memory(seed, n),
        _plan(n),
        _output(seed, n),
    )
    return Snapshot(
        tuple(
            SnapshotLayer(name, suspended, state)
            for name, state in zip(LAYER_NAMES, states, strict=True)
        )
    )


def realistic_specs() -> tuple[LayerSpec, ...]:
    """The replayable layers that produce :func:`realistic_state`, in its layer order."""
    return (
        LayerSpec("prompt", "dify.prompt.context", {}, {"v": 4}, {"max_docs": 3}),
        LayerSpec("execution", "dify.workflow.context", {"prompt": "prompt"}, {}, {"trace": 4}),
        LayerSpec("history", "pydantic_ai.history", {"prompt": "prompt"}, {}, {"window": WINDOW}),
        LayerSpec("memory", "dify.memory.structured", {"history": "history"}, {}, {"facts": 8}),
        LayerSpec("plan", "dify.planner.tree", {"memory": "memory"}, {}, {"depth": 3}),
        LayerSpec("output", "dify.output.structured", {"plan": "plan"}, {}, {"schema": "order"}),
    )


@dataclass(frozen=True)
class AgentStates:
    """The states a benchmark saves, one per iteration in turn, and the specs behind them."""

    kind: str
    snapshots: tuple[Snapshot, ...]
    specs: tuple[LayerSpec, ...]

    @property
    def variant(self) -> str | None:
        """How a result of another kind than the default is told apart (``--snapshot small``)."""
        return None if self.kind == DEFAULT_SNAPSHOT else f"--snapshot {self.kind}"

    def facts(self) -> dict[str, Any]:
        """What a result says about the states: kind, encoded sizes, and its variant."""
        sizes = [len(pack(snapshot)) for snapshot in self.snapshots]
        facts: dict[str, Any] = {
            "snapshot": self.kind,
            "snapshot_bytes_mean": round(sum(sizes) / len(sizes)),
            "snapshot_bytes_range": [min(sizes), max(sizes)],
            "distinct_states": len(sizes),
        }
        if self.variant is not None:
            facts["variant"] = self.variant
        return facts


def agent_states(kind: str | None = None, *, count: int = CYCLE, seed: int = 7) -> AgentStates:
    """``count`` consecutive realistic states (iterations ``0..count-1``), or the one small
    snapshot; ``None`` is :data:`DEFAULT_SNAPSHOT`."""
    kind = kind or DEFAULT_SNAPSHOT
    if kind == REALISTIC:
        snapshots = tuple(realistic_state(n, seed) for n in range(count))
        return AgentStates(kind, snapshots, realistic_specs())
    if kind == SMALL:
        from bench.hot_path import build_snapshot, build_specs

        return AgentStates(kind, (build_snapshot(),), build_specs())
    raise ValueError(f"snapshot must be one of {SNAPSHOT_KINDS}, got {kind!r}")
