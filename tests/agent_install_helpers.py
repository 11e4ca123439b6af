"""Shared by the unit and integration tests of ``rigshift agent install``: a fake
``systemctl`` first on PATH, and the install command with a test enrollment token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from worker_agent.cli import agent_group

__all__ = ["TOKEN", "install", "systemctl_log"]

TOKEN = "rsft_Secret-Token_0123456789abcdef"


@pytest.fixture
def systemctl_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake ``systemctl`` first on PATH; each call appends its arguments to the log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def install(tmp_path: Path, *args: str, token: str = TOKEN) -> Result:
    return CliRunner().invoke(
        agent_group,
        [
            "install",
            "--broker",
            "broker.example:50051",
            "--token",
            token,
            "--config-dir",
            str(tmp_path / "etc"),
            "--unit-dir",
            str(tmp_path / "units"),
            *args,
        ],
    )
