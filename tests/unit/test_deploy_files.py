"""The deployment examples in docs/deploy agree with the pool they deploy."""

from __future__ import annotations

import re
from pathlib import Path

from workers.supervisor import Limits

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"
MARGIN_S = 5
"""Room between the pool's own kill of a stuck process and the service manager's SIGKILL."""


def unit_settings() -> dict[str, str]:
    lines = (DEPLOY / "agent-sessions-worker.service").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if "=" in line and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def test_the_systemd_unit_stops_the_group_and_waits_past_the_pools_own_bound() -> None:
    unit = unit_settings()
    assert unit["KillMode"] == "control-group" and unit["KillSignal"] == "SIGTERM"
    assert int(unit["TimeoutStopSec"]) >= Limits().stop_timeout_s + MARGIN_S
    assert " worker " in unit["ExecStart"] and unit["ExecStart"].split()[0].endswith(
        "agent-sessions"
    )
    assert unit["ExecStartPre"].endswith("agent-sessions migrate")
    assert unit["Restart"] == "always"


def test_the_kubernetes_deployment_waits_past_the_bound_and_probes_this_pool() -> None:
    text = (DEPLOY / "kubernetes.yaml").read_text()
    grace = re.search(r"terminationGracePeriodSeconds:\s*(\d+)", text)
    assert grace is not None and int(grace.group(1)) >= Limits().stop_timeout_s + MARGIN_S
    assert 'command: ["agent-sessions", "health", "--local"]' in text
    ports = set(re.findall(r"--metrics-port\", \"(\d+)\"", text))
    assert ports == {"9108"} and "containerPort: 9108" in text
    assert 'prometheus.io/port: "9108"' in text
