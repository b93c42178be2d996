"""Test and demo machinery, not the lifecycle API: the loopback fake agent backend and the
``agent-sessions worker`` process harness. ``python -m agent_sessions.testing.fake_backend``
serves the fake standalone."""
