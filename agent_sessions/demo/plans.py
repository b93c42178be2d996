"""What the demo will do: its flags, the planned outcome of every agent run, and the scopes
and compositions of its workflow runs and conversations."""

from __future__ import annotations

import random
from dataclasses import dataclass

from agent_backend.models import RunComposition, RunLayerSpec
from agent_sessions.demo.stack import PREFIX_PATTERN
from cache.records import ConversationScope, Scope


@dataclass(frozen=True)
class DemoConfig:
    """The flags of ``agent-sessions demo``; ranges are checked by click, the rest here."""

    runs: int = 24
    nodes: int = 3
    iterations: int = 15
    conversations: int = 12
    turns: int = 12
    config_switch_every: int = 3
    threads: int = 4
    fail_rate: float = 0.05
    cancel_rate: float = 0.03
    pause_rate: float = 0.05
    workers: int = 2
    prefix: str | None = None
    """``None``: the deployment's ``ASC_KEY_PREFIX`` plus ``-demo`` (:func:`demo_prefix`)."""
    seed: int | None = None
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.prefix is not None and not PREFIX_PATTERN.match(self.prefix):
            raise ValueError(f"--prefix must match {PREFIX_PATTERN.pattern}, got {self.prefix!r}")
        if self.fail_rate + self.cancel_rate + self.pause_rate > 1:
            raise ValueError("--fail-rate + --cancel-rate + --pause-rate must not exceed 1")


def plan_behaviours(config: DemoConfig, rng: random.Random) -> list[list[str]]:
    """Per workflow run, the fake behaviour of each agent run, loop iteration by iteration."""
    steps = [(it, node) for it in range(config.iterations) for node in range(config.nodes)]
    last = config.iterations - 1
    return [[_behaviour(config, rng, it < last) for it, _ in steps] for _ in range(config.runs)]


def plan_turns(config: DemoConfig, rng: random.Random) -> list[list[str]]:
    """Per conversation, the fake behaviour of each turn."""
    last = config.turns - 1
    return [
        [_behaviour(config, rng, turn < last) for turn in range(config.turns)]
        for _ in range(config.conversations)
    ]


def _behaviour(config: DemoConfig, rng: random.Random, may_pause: bool) -> str:
    """A pause is never planned on the last entry: every pause gets its resume."""
    x = rng.random()
    if x < config.fail_rate:
        return "fail"
    if x < config.fail_rate + config.cancel_rate:
        return "cancel"
    paused = x < config.fail_rate + config.cancel_rate + config.pause_rate
    return "pause" if paused and may_pause else "succeed"


def composition(scope: Scope | ConversationScope) -> RunComposition:
    """An agent's layers; ``history`` is added by the lifecycle, plugins never stored."""
    if isinstance(scope, ConversationScope):
        context = {"conversation": scope.conversation_id}
    else:
        context = {"node": scope.node_id}
    return RunComposition(
        layers=[
            RunLayerSpec(name="execution_context", type="dify.execution_context", config=context),
            RunLayerSpec(name="llm", type="dify.plugin.llm", config={"model": "fake-model"}),
            RunLayerSpec(name="tools", type="dify.plugin.tools", config={"tools": ["search"]}),
        ]
    )


def demo_scope(tenant_id: str, run_id: str, node: int, iteration: int) -> Scope:
    return Scope(
        tenant_id=tenant_id,
        app_id="demo-app",
        workflow_id="demo-loop-workflow",
        workflow_run_id=run_id,
        node_id=f"agent-node-{node}",
        node_execution_id=f"agent-node-{node}-iter-{iteration:03d}",
        binding_id=f"binding-{node}",
        agent_id=f"agent-{node}",
        agent_config_snapshot_id=f"agent-{node}-config-1",
    )


def chat_scope(tenant_id: str, conversation_id: str, config: int, turn: int) -> ConversationScope:
    return ConversationScope(
        tenant_id=tenant_id,
        app_id="demo-chat-app",
        conversation_id=conversation_id,
        binding_id="chat-binding",
        agent_id="chat-agent",
        agent_config_snapshot_id=f"chat-agent-config-{config}",
        message_id=f"message-{turn:03d}",
    )
