"""Working and checkpoint directories on the rig, and the archives that fill them.

Layout under the agent's state directory::

    artifacts/<sha256>.tar.gz        downloaded archives, kept only once verified
    attempts/<job_id>-<attempt>/     the job's working directory (removed afterwards)
    checkpoints/<job_id>/            $RIGSHIFT_CHECKPOINT_DIR, shared by the job's attempts
    checkpoints/.<job_id>.snapshot/  hard links of one checkpoint while it is uploaded
    outputs/<job_id>-<attempt>/      $RIGSHIFT_OUTPUT_DIR (archived and uploaded at the end)
    inputs/<sha256>/                 an input archive, extracted once and shared, read-only
    input-views/<job_id>-<attempt>/  $RIGSHIFT_INPUT_DIR: NAME -> ../../inputs/<sha256>
    environments/<key>/              Python environments (worker_agent.environments)

An archive is streamed from ``ArtifactService.DownloadArtifact`` into a temporary
file while its sha256 is computed; it is kept only when the digest matches and
it is no bigger than the limit. The archive format itself (deterministic packing,
safe extraction, :class:`~rigshift.archive.ArchiveError`) is shared with the client
in :mod:`rigshift.archive`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from rigshift.archive import ArchiveError

__all__ = ["Workspace", "directory_bytes", "save_verified"]


async def save_verified(
    chunks: AsyncIterator[bytes], sha256: str, dest: Path, *, max_bytes: int
) -> Path:
    """Write streamed bytes to ``dest`` only if they hash to ``sha256`` and fit ``max_bytes``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}-{secrets.token_hex(4)}")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as f:
            async for data in chunks:
                size += len(data)
                if size > max_bytes:
                    raise ArchiveError(f"archive {sha256[:12]} is larger than {max_bytes} bytes")
                digest.update(data)
                f.write(data)
        if digest.hexdigest() != sha256.lower():
            raise ArchiveError(
                f"archive digest mismatch: expected {sha256[:12]}…, got {digest.hexdigest()[:12]}…"
            )
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


class Workspace:
    """Directories of the attempts on this rig, under ``root`` (the agent's state directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def archive_path(self, sha256: str) -> Path:
        """Where a verified archive is cached."""
        return self.root / "artifacts" / f"{sha256.lower()}.tar.gz"

    def attempt_dir(self, job: str, attempt: int) -> Path:
        """A fresh, empty working directory for one attempt."""
        path = self.root / "attempts" / f"{_job_id(job)}-{attempt}"
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def checkpoint_dir(self, job: str) -> Path:
        """``$RIGSHIFT_CHECKPOINT_DIR`` of a job (kept across its attempts on this rig)."""
        path = self.root / "checkpoints" / _job_id(job)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def output_dir(self, job: str, attempt: int) -> Path:
        """A fresh, empty ``$RIGSHIFT_OUTPUT_DIR`` for one attempt."""
        return _fresh(self.root / "outputs" / f"{_job_id(job)}-{attempt}")

    def input_view(self, job: str, attempt: int) -> Path:
        """A fresh, empty ``$RIGSHIFT_INPUT_DIR`` for one attempt (filled with links)."""
        return _fresh(self.root / "input-views" / f"{_job_id(job)}-{attempt}")

    def input_cache(self, sha256: str) -> Path:
        """Where an input archive is extracted once for every attempt that names it."""
        return self.root / "inputs" / sha256.lower()

    def evict_inputs(self, max_bytes: int, in_use: set[str]) -> list[str]:
        """Remove the least recently used extracted inputs (by the mtime each use sets)
        that no running attempt names, until all of them fit ``max_bytes``; the sha256s
        removed. The same rule as the environments' cache."""
        root = self.root / "inputs"
        if not root.is_dir():
            return []
        entries = []
        for path in root.iterdir():
            if path.is_dir() and not path.name.endswith(".part"):
                with contextlib.suppress(OSError):
                    entries.append((path.stat().st_mtime, path.name, directory_bytes(path)))
        total = sum(size for _, _, size in entries)
        removed = []
        for _, name, size in sorted(entries):
            if total <= max_bytes:
                break
            if name in in_use:
                continue
            _remove_read_only(root / name)
            total -= size
            removed.append(name)
        return removed

    def clean_attempt(self, job: str, attempt: int, *, succeeded: bool) -> None:
        """Remove an attempt's working, output and input directories; a succeeded job's
        checkpoints too."""
        name = f"{_job_id(job)}-{attempt}"
        for sub in ("attempts", "outputs", "input-views"):
            shutil.rmtree(self.root / sub / name, ignore_errors=True)
        # What an upload of its checkpoint may have left (worker_agent/checkpoints.py).
        shutil.rmtree(self.root / "checkpoints" / f".{_job_id(job)}.snapshot", ignore_errors=True)
        if succeeded:
            shutil.rmtree(self.root / "checkpoints" / _job_id(job), ignore_errors=True)


def _remove_read_only(path: Path) -> None:
    """rmtree of a tree made read-only (inputs): directories get u+w back first."""
    for dirpath, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o755)
    shutil.rmtree(path, ignore_errors=True)


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def directory_bytes(root: Path) -> int:
    """Total size of the regular files under ``root``."""
    total = 0
    for dirpath, _dirs, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / name).lstat().st_size
    return total


def _job_id(job: str) -> str:
    job_id = job.rpartition("/")[2]
    if not job_id or job_id in (".", "..") or "/" in job_id or "\\" in job_id:
        raise ValueError(f"bad job name {job!r}")
    return job_id
