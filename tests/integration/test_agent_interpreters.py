"""Which Python interpreter jobs get (``worker_agent.interpreters``): the configured one, the
agent's own, or a system Python the job user can run; and another interpreter names other
environments (its identity is part of the environment key)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from worker_agent.environments import environment_key

pytestmark = pytest.mark.timeout(120)


# --- which interpreter jobs get -------------------------------------------------------------


def _exe(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def test_job_python_prefers_the_configured_then_the_agents_own(tmp_path, monkeypatch) -> None:
    from worker_agent.interpreters import job_python

    notes: list[str] = []
    assert job_python("/opt/py/bin/python3", 65534, notes.append) == "/opt/py/bin/python3"
    assert job_python("", None, notes.append) == sys.executable  # jobs keep the agent's uid
    assert job_python("", os.geteuid(), notes.append) == sys.executable
    assert notes == []


def test_job_python_falls_back_to_a_system_python_the_job_user_can_run(
    tmp_path, monkeypatch, request
) -> None:
    from worker_agent import interpreters
    from worker_agent.interpreters import job_python

    private = tmp_path / "root-home"
    own = _exe(private / ".pyenv" / "bin" / "python3")
    private.chmod(0o700)  # like /root: nobody can reach the interpreter inside
    public = Path(tempfile.mkdtemp(prefix="rigshift-sys-", dir="/tmp"))  # pytest's are 0700
    public.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(public, ignore_errors=True))
    system = _exe(public / "usr" / "bin" / "python3")
    for d in (public / "usr", public / "usr" / "bin"):
        d.chmod(0o755)
    monkeypatch.setattr(interpreters.sys, "executable", own)
    monkeypatch.setattr(interpreters, "SYSTEM_PYTHONS", ("/nonexistent/python3", system))
    notes: list[str] = []
    assert job_python("", 65534, notes.append) == system
    assert "not usable by the job user" in notes[0] and system in notes[0]
    # No usable system Python either: say so, keep the agent's own.
    monkeypatch.setattr(interpreters, "SYSTEM_PYTHONS", ())
    notes.clear()
    assert job_python("", 65534, notes.append) == own
    assert "will fail to start" in notes[0]


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system Python here")
def test_another_interpreter_names_other_environments() -> None:
    from worker_agent.interpreters import interpreter_identity

    system = interpreter_identity("/usr/bin/python3")
    version = system.split("\0")[0]
    assert version.count(".") == 2  # e.g. 3.11.2
    ours = interpreter_identity()
    sha = "a" * 64
    assert environment_key(sha, ours) == environment_key(sha)
    if system != ours:
        assert environment_key(sha, system) != environment_key(sha)
