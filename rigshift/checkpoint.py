"""The checkpoint marker: how a job says its checkpoint is complete, and how the rig reads it.

Job code calls :func:`checkpoint_complete` (documented to users as
``from client.checkpoint import checkpoint_complete``)::

    save(model, os.path.join(ckpt_dir, "model.pt"))
    save(optimizer, os.path.join(ckpt_dir, "optim.pt"))
    checkpoint_complete()

and the agent (``worker_agent/checkpoints.py``) reads the marker with
:func:`read_marker` and compares it with :func:`directory_state`. It then uploads
that directory as it is at that moment, as soon as it sees the signal (at most once
per the rig's ``checkpoint_min_interval_s``), and only if the files are still the
ones the signal named: a checkpoint of several files is never uploaded half old,
half new. Once a job has signalled, only signalled checkpoints are uploaded. Outside
Rigshift (``$RIGSHIFT_CHECKPOINT_DIR`` unset) the call does nothing.

The signal is a file, ``.rigshift-complete``, written atomically (temporary file, then
rename) into the checkpoint directory; it is never part of the uploaded checkpoint.
It holds JSON: ``{"counter": N, "files": [[path, size, mtime_ns, inode], ...]}``,
``counter`` one more than the previous signal's, ``files`` what
:func:`directory_state` gives. This module needs only the standard library: a job
whose environment lacks the ``rigshift`` package may copy it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["MARKER", "FileState", "checkpoint_complete", "directory_state", "read_marker"]

MARKER = ".rigshift-complete"
"""Name of the signal file in the checkpoint directory (and the prefix of its temporary
files); never uploaded."""

FileState = tuple[str, int, int, int]
"""(path relative to the directory, size, mtime_ns, inode) of one file or symlink."""


def directory_state(root: str | os.PathLike[str]) -> tuple[FileState, ...]:
    """Every regular file and symlink under ``root`` (links not followed) as
    (relative path, size, mtime_ns, inode), sorted; names starting with
    :data:`MARKER` at the top are left out.

    A file replaced by a rename gets another inode; one rewritten in place another
    size or mtime. Files that vanish while it looks are left out.
    """
    base = os.fspath(root)
    out: list[FileState] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(base, rel)))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if not rel and entry.name.startswith(MARKER):
                continue
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(path)
            elif entry.is_file(follow_symlinks=False) or entry.is_symlink():
                out.append((path, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(out))


def read_marker(root: str | os.PathLike[str]) -> tuple[int, tuple[FileState, ...]] | None:
    """(counter, files) of the directory's signal, or None when there is none or it
    cannot be read."""
    try:
        data = json.loads((Path(root) / MARKER).read_text())
        counter = int(data["counter"])
        files = tuple(
            (str(p), int(size), int(mtime), int(ino)) for p, size, mtime, ino in data["files"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return counter, tuple(sorted(files))


def checkpoint_complete(directory: str | os.PathLike[str] | None = None) -> int:
    """Signal that the checkpoint in ``directory`` (default ``$RIGSHIFT_CHECKPOINT_DIR``)
    is complete; returns the signal's counter (0 when there is no directory to signal in).

    Call it after the last file of a checkpoint is in place, from one process (e.g.
    rank 0). Cheap: it lists the directory and writes a small file.
    """
    where = directory if directory is not None else os.environ.get("RIGSHIFT_CHECKPOINT_DIR")
    if not where or not os.path.isdir(where):
        return 0
    previous = read_marker(where)
    counter = previous[0] + 1 if previous else 1
    body = json.dumps({"counter": counter, "files": [list(f) for f in directory_state(where)]})
    tmp = os.path.join(where, f"{MARKER}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(body)
    os.replace(tmp, os.path.join(where, MARKER))
    return counter
