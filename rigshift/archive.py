"""The working-directory archive format: a deterministic tar.gz, and its safe extraction.

Working directories, inputs, outputs and checkpoints travel as one format. The
client packs what it uploads (``client.sdk``), the agent packs outputs and
checkpoints and extracts what it downloads (``worker_agent.workdir``,
``worker_agent.checkpoints``), and the same tree always packs to the same bytes
on both sides, so the broker stores an unchanged directory once (by sha256).

Packing (:func:`pack_directory`): sorted entries, PAX format, no mtimes, owners or
gzip time; sockets, fifos and device files are left out (extraction would refuse
them); ArchiveError past the caller's limit.

Extraction (:func:`safe_extract`) refuses absolute paths, ``..``, links that leave
the directory, and device files or fifos, and an archive whose files add up to more
than :data:`MAX_EXTRACTED_BYTES`; it then uses tarfile's ``data`` filter as a second
line of defence.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path, PurePosixPath

__all__ = ["MAX_EXTRACTED_BYTES", "ArchiveError", "pack_directory", "safe_extract"]

MAX_EXTRACTED_BYTES = 4 << 30
"""Largest total size of the files inside one archive (guards against tar bombs)."""


class ArchiveError(Exception):
    """An archive failed its digest, its size limit or a safety check."""


def _check_member(member: tarfile.TarInfo, root: Path) -> None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise ArchiveError(f"unsafe path in archive: {member.name!r}")
    if member.isdev() or member.isfifo():
        raise ArchiveError(f"device or fifo in archive: {member.name!r}")
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        base = PurePosixPath(member.name).parent if member.issym() else PurePosixPath()
        resolved = os.path.normpath(root / base / target)
        if target.is_absolute() or not resolved.startswith(str(root) + os.sep):
            raise ArchiveError(
                f"link leaving the directory: {member.name!r} -> {member.linkname!r}"
            )


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a .tar.gz into ``dest`` after checking every member (see the module docstring)."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with tarfile.open(archive, mode="r:*") as tar:
        members = tar.getmembers()
        total = 0
        for member in members:
            _check_member(member, root)
            total += max(0, member.size)
        if total > MAX_EXTRACTED_BYTES:
            raise ArchiveError(f"archive expands to {total} bytes (limit {MAX_EXTRACTED_BYTES})")
        tar.extractall(root, members=members, filter="data")


def pack_directory(root: Path, *, max_bytes: int) -> bytes:
    """A deterministic tar.gz of a directory, in memory (sorted, no mtimes, owners or gzip time).

    The same tree always gives the same bytes, so an unchanged checkpoint has the
    same sha256 and the broker stores it once. ArchiveError past ``max_bytes``.
    """
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            for entry in sorted([*dirnames, *filenames]):
                full = base / entry
                info = tar.gettarinfo(str(full), arcname=full.relative_to(root).as_posix())
                if info is None or info.isfifo() or info.isdev():  # sockets, fifos, devices
                    continue  # (safe_extract would refuse them)
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if info.isfile():
                    with full.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
                if buffer.tell() > max_bytes:
                    raise ArchiveError(f"{root} packs to more than {max_bytes} bytes")
    data = buffer.getvalue()
    if len(data) > max_bytes:
        raise ArchiveError(f"{root} packs to more than {max_bytes} bytes")
    return data
