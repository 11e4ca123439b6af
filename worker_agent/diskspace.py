"""The disk under an attempt's directories: full-disk errors, free space, read-only trees."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

__all__ = [
    "DISK_FULL_BELOW_BYTES",
    "disk_full",
    "disk_full_message",
    "free_bytes",
    "read_only",
    "remove_tree",
]

#: A failed job that leaves less than this free under its directories failed on a full disk.
DISK_FULL_BELOW_BYTES = 1 << 20

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(err: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``err`` (itself, or what it was raised from)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return err
        err = err.__cause__ or err.__context__
    return None


def disk_full_message(err: OSError) -> str:
    name = errno.errorcode.get(err.errno or 0, "ENOSPC")
    where = f" ({err.filename})" if err.filename else ""
    return f"the rig's disk is full: {name}, {err.strerror}{where}"


def free_bytes(paths: list[Path]) -> int:
    """The least free space of the filesystems holding ``paths`` (those that exist)."""
    free = []
    for path in paths:
        with contextlib.suppress(OSError):
            free.append(shutil.disk_usage(path).free)
    return min(free, default=DISK_FULL_BELOW_BYTES)


def read_only(root: Path) -> None:
    """Make a shared input cache read-only for job users (the sandbox also binds it
    read-only; a job running as root without a sandbox could still write it)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o444)
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o555)
    os.chmod(root, 0o555)


def remove_tree(root: Path) -> None:
    """rmtree of a tree that may have been made read-only (:func:`read_only`)."""
    for dirpath, _dirs, _files in os.walk(root):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o755)
    shutil.rmtree(root, ignore_errors=True)
