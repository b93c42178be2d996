"""``agent-sessions demo``: a loop-heavy workload through the real stack, then verified."""

from __future__ import annotations

from agent_sessions.demo.plans import DemoConfig
from agent_sessions.demo.run import main

__all__ = ["DemoConfig", "main"]
