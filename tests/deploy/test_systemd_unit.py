"""deploy/systemd/rigshift-agent.service: hardened, restarting, reading /etc/rigshift/agent.toml.

Parsed with configparser (a unit file is INI-like: sections, ``Key=value``); where
``systemd-analyze`` exists, ``systemd-analyze verify`` checks it too (unknown keys, bad
values), with ExecStart pointed at an executable that exists on this machine.
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_helpers import SYSTEMD_UNIT

REQUIRED = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ReadWritePaths": "/var/lib/rigshift",
    "Restart": "on-failure",
    "RestartSec": "5",
    "User": "rigshift",
    "SupplementaryGroups": "video",
}
EXEC_START = "/opt/rigshift/bin/rigshift agent run --config /etc/rigshift/agent.toml"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        strict=True, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(SYSTEMD_UNIT.read_text())
    return parser


def test_sections() -> None:
    unit = _unit()
    assert unit.sections() == ["Unit", "Service", "Install"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["Wants"]
    assert "network-online.target" in unit["Unit"]["After"]


def test_hardening_and_restart_keys() -> None:
    service = _unit()["Service"]
    for key, value in REQUIRED.items():
        assert service.get(key) == value, f"{key}={service.get(key)!r}, want {value!r}"
    assert service["ExecStart"] == EXEC_START
    # The devices must stay visible: PrivateDevices or a DeviceAllow list would hide /dev/nvidia*.
    assert "PrivateDevices" not in service and "DeviceAllow" not in service
    assert service["CapabilityBoundingSet"] == ""
    assert service["KillMode"] == "mixed", "the agent drains its jobs itself on SIGTERM"
    assert int(service["TimeoutStopSec"]) > 60, "longer than the agent's 60 s drain grace"


def test_exec_start_uses_the_agent_cli() -> None:
    """`rigshift agent run` exists and takes --config (written by `rigshift agent install`)."""
    from rigshift_cli import main

    words = shlex.split(_unit()["Service"]["ExecStart"])
    run = main.commands["agent"].commands["run"]  # type: ignore[attr-defined]
    options = {opt for p in run.params for opt in p.opts}
    assert words[1:3] == ["agent", "run"] and words[3] == "--config" and "--config" in options


def test_variables_come_from_an_optional_file() -> None:
    """RIGSHIFT_AGENT_* overrides (worker_agent/settings.py) in a file that may be absent."""
    text = SYSTEMD_UNIT.read_text()
    assert _unit()["Service"]["EnvironmentFile"] == "-/etc/rigshift/agent.env"
    assert "RIGSHIFT_AGENT_" in text


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    exe = shutil.which("true")
    assert exe is not None
    unit = tmp_path / SYSTEMD_UNIT.name
    unit.write_text(SYSTEMD_UNIT.read_text().replace("/opt/rigshift/bin/rigshift", exe))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )
