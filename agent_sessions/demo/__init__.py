"""``agent-sessions demo``: a loop-heavy workload through the real stack, then verified."""

from __future__ import annotations

from agent_sessions.demo.run import DemoConfig, main

__all__ = ["DemoConfig", "main"]
