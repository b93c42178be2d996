"""``python -m agent_sessions`` runs the CLI."""

from __future__ import annotations

from agent_sessions.cli import main

main()
