"""Job isolation, the pure part: the wrapped argv, exit statuses, refusals, directory
ownership. Real jobs in bubblewrap are in tests/integration/test_agent_sandbox.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker_agent.sandbox import (
    Isolation,
    SandboxError,
    SandboxPolicy,
    exit_status,
    prepare_dirs,
    resolve,
    wrap,
)

# --- the argv (pure) ---------------------------------------------------------------------

FULL = Isolation(
    bwrap="/usr/bin/bwrap",
    uid=65534,
    gid=65533,
    user="nobody",
    setpriv="/usr/bin/setpriv",
    devices=("/dev/nvidia0", "/dev/nvidiactl"),
    hidden=("/var/lib/rigshift",),
    masked=("/etc/rigshift/agent.toml",),
)


def test_wrap_without_isolation_is_the_argv() -> None:
    assert wrap(["python", "train.py"], cwd="/w", writable=["/c"], isolation=Isolation()) == [
        "python",
        "train.py",
    ]


def test_wrap_bwrap_and_job_user() -> None:
    argv = wrap(
        ["python", "train.py"],
        cwd="/var/lib/rigshift/attempts/j-1",
        writable=["/var/lib/rigshift/checkpoints/j"],
        isolation=FULL,
    )
    assert argv == [
        "/usr/bin/bwrap",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--dev-bind-try", "/dev/nvidia0", "/dev/nvidia0",
        "--dev-bind-try", "/dev/nvidiactl", "/dev/nvidiactl",
        "--proc", "/proc",
        "--perms", "1777", "--tmpfs", "/tmp",
        "--perms", "1777", "--tmpfs", "/dev/shm",
        # The agent's state (identity, Ray token, other jobs' directories) is hidden …
        "--tmpfs", "/var/lib/rigshift",
        "--ro-bind", "/dev/null", "/etc/rigshift/agent.toml",
        "--perms", "0755", "--dir", "/var/lib/rigshift/attempts",
        "--perms", "0755", "--dir", "/var/lib/rigshift/checkpoints",
        # … and only the job's own directories are mounted back, writable.
        "--bind", "/var/lib/rigshift/attempts/j-1", "/var/lib/rigshift/attempts/j-1",
        "--bind", "/var/lib/rigshift/checkpoints/j", "/var/lib/rigshift/checkpoints/j",
        "--chdir", "/var/lib/rigshift/attempts/j-1",
        "--setenv", "HOME", "/var/lib/rigshift/attempts/j-1",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--die-with-parent", "--new-session",
        "--",
        "/usr/bin/setpriv",
        "--reuid", "65534", "--regid", "65533", "--clear-groups", "--no-new-privs",
        "--pdeathsig", "KILL",
        "--",
        "python", "train.py",
    ]  # fmt: skip


def test_wrap_job_user_without_bwrap() -> None:
    isolation = Isolation(uid=1001, gid=1001, user="rigshift-job", setpriv="setpriv")
    assert wrap(["./run.sh"], cwd="/w", writable=[], isolation=isolation) == [
        "setpriv",
        "--reuid", "1001", "--regid", "1001", "--clear-groups", "--no-new-privs",
        "--pdeathsig", "KILL", "--", "./run.sh",
    ]  # fmt: skip


def test_wrap_unprivileged_agent_keeps_its_uid() -> None:
    argv = wrap(["true"], cwd="/w", writable=["/w"], isolation=Isolation(bwrap="bwrap"))
    assert "setpriv" not in argv and argv.count("--bind") == 1  # the same dir once
    assert argv[-2:] == ["--", "true"]


@pytest.mark.parametrize(
    ("code", "bwrap", "expected"),
    [(143, "bwrap", -15), (137, "bwrap", -9), (3, "bwrap", 3), (128, "bwrap", 128), (143, "", 143)],
)
def test_exit_status(code: int, bwrap: str, expected: int) -> None:
    assert exit_status(code, Isolation(bwrap=bwrap)) == expected


def test_unknown_mode_and_user_are_refused() -> None:
    with pytest.raises(SandboxError, match="one of auto, bwrap, none"):
        resolve(SandboxPolicy(mode="docker"))
    if os.geteuid() == 0:
        with pytest.raises(SandboxError, match="does not exist"):
            resolve(SandboxPolicy(mode="none", job_user="no-such-user-xyz"))


def test_prepare_dirs_does_not_follow_links(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    outside = tmp_path / "outside"
    outside.write_text("root's")
    job = tmp_path / "job"
    (job / "sub").mkdir(parents=True)
    (job / "sub" / "f").write_text("x")
    (job / "link").symlink_to(outside)
    prepare_dirs(Isolation(uid=65534, gid=65534), [str(job)])
    assert (job / "sub" / "f").stat().st_uid == 65534
    assert os.lstat(job / "link").st_uid == 65534
    assert outside.stat().st_uid == 0
