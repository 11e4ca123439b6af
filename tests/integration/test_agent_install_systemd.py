"""``rigshift agent install`` with processes: ``--start`` runs a fake ``systemctl`` (a script
first on PATH that records its arguments), and ``systemd-analyze verify`` checks the written
unit. The files install writes are tested in tests/unit/test_agent_install.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import agent_install_helpers
import pytest
from agent_install_helpers import install

systemctl_log = agent_install_helpers.systemctl_log  # the fixture, by name


def test_start_runs_daemon_reload_then_enable_now(tmp_path: Path, systemctl_log: Path) -> None:
    result = install(tmp_path, "--start")
    assert result.exit_code == 0, result.output
    assert systemctl_log.read_text().splitlines() == [
        "daemon-reload",
        "enable --now rigshift-agent.service",
    ]
    assert "systemctl daemon-reload &&" not in result.stdout  # done, so not a next step


def test_written_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    assert install(tmp_path, "--user", "root").exit_code == 0
    unit = tmp_path / "units" / "rigshift-agent.service"
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
        done.stdout + done.stderr
    )
