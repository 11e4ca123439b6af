"""Small real filesystems for disk-full tests: a tmpfs of a few MiB mounted on a test's
directory, and a file that fills it.

Import it as ``from disk_helpers import fill, tmpfs`` (tests/ is on sys.path). Mounting
needs root (or CAP_SYS_ADMIN); elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["fill", "free_bytes", "tmpfs"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``path`` (created if missing) for the block; unmounted
    after it (lazily if something still holds it), whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount(8) on this machine")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        umount = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if umount.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still write on ``path``'s filesystem."""
    return shutil.disk_usage(path).free


def fill(path: Path, leave: int = 0) -> Path:
    """Write a file ``path`` until its filesystem has at most ``leave`` bytes free; the file."""
    chunk = b"\0" * (64 << 10)
    with open(path, "wb", buffering=0) as f:
        while (room := free_bytes(path.parent) - leave) > 0:
            try:
                f.write(chunk[: min(len(chunk), room)])
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                break
    return path
