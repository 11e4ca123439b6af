"""Content-addressed archive store on the local filesystem.

Layout under ``root``::

    ab/abcdef…            a complete blob, named by its sha256 (written by an atomic rename)
    .partial/abcdef…      what arrived of an interrupted upload; its length is the
                          ``received_bytes`` an upload resumes from

Each upload has a purpose, and each purpose a size limit: working directories and
checkpoints (``Purpose.DEFAULT``), job inputs and attempt outputs. Blobs are never
modified; :meth:`ArtifactStore.collect` removes old ones the caller no longer
references (``broker.retention`` says which).

A full disk (``ENOSPC``, or ``EDQUOT`` past a quota) refuses the upload with
``RESOURCE_EXHAUSTED`` reason ``ARTIFACT_STORE_FULL``: up front when the declared
size does not fit the free space, else as soon as a write, the ``fsync`` or the
final rename fails. What that upload wrote is removed at once (space back, and
nothing left to resume from), so a blob exists only after a complete, verified,
synced write and its rename; the rest of the broker does not use this disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from broker.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_MAX_INPUT_BYTES",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "PARTIAL_MAX_AGE_S",
    "ArtifactStore",
    "Collected",
    "Purpose",
]

CHUNK_BYTES = 1 << 20
DEFAULT_MAX_INPUT_BYTES = 10 << 30
"""Default of ``rigshift broker serve --max-input-bytes``."""
DEFAULT_MAX_OUTPUT_BYTES = 1 << 30
"""Default of ``rigshift broker serve --max-output-bytes`` (per attempt)."""
PARTIAL_MAX_AGE_S = 86400.0
"""An interrupted upload untouched for this long is removed by :meth:`ArtifactStore.collect`."""
_PARTIAL_DIR = ".partial"
_FULL = (errno.ENOSPC, errno.EDQUOT)

log = logging.getLogger("rigshift.broker.artifacts")


class Purpose(IntEnum):
    """What an upload is for (values of ``rigshift.v1.ArtifactPurpose``)."""

    DEFAULT = 0  # a working directory or a checkpoint
    INPUT = 1
    OUTPUT = 2


@dataclass(frozen=True, slots=True)
class Collected:
    """What one :meth:`ArtifactStore.collect` removed."""

    blobs: int = 0
    partials: int = 0
    bytes: int = 0


def _is_sha(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _store_full(root: Path, sha256: str, why: str) -> ResourceExhausted:
    """The error of an upload refused because the store's disk is full (logged: the
    operator has to free space)."""
    log.warning("artifact store %s is full: upload of %s refused (%s)", root, sha256[:12], why)
    return ResourceExhausted(
        f"the broker's artifact store is full: {why}; nothing of this upload was kept, "
        "retry once the operator has freed space",
        reason="ARTIFACT_STORE_FULL",
        metadata={"sha256": sha256},
    )


class ArtifactStore:
    """Blobs under ``root/ab/abcdef…`` named by their sha256; see the module docstring.

    One broker process writes a store; an upload of a sha256 that is already being
    uploaded is refused (``UPLOAD_IN_PROGRESS``) until the first one ends.
    """

    def __init__(
        self,
        root: Path | str,
        max_bytes: int = 100 << 20,
        *,
        max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        """Largest working directory or checkpoint archive."""
        self.max_input_bytes = max_input_bytes
        """Largest input archive."""
        self.max_output_bytes = max_output_bytes
        """Largest output archive of one attempt (agents learn it with each assignment)."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / _PARTIAL_DIR).mkdir(exist_ok=True)
        self._active: set[str] = set()

    @staticmethod
    def check(sha256: str, field: str = "sha256") -> str:
        """The name if it is 64 lowercase hex digits, else InvalidArgument (never a path)."""
        if not _is_sha(sha256):
            raise InvalidArgument.of([FieldViolation(field, "must be 64 lowercase hex digits")])
        return sha256

    def limit_for(self, purpose: Purpose | int) -> int:
        """The size limit of uploads with this purpose."""
        return {
            Purpose.INPUT: self.max_input_bytes,
            Purpose.OUTPUT: self.max_output_bytes,
        }.get(Purpose(purpose), self.max_bytes)

    def path(self, sha256: str) -> Path:
        """Where a blob lives (it may not exist)."""
        self.check(sha256)
        return self.root / sha256[:2] / sha256

    def partial_path(self, sha256: str) -> Path:
        """Where an interrupted upload of ``sha256`` keeps its bytes (it may not exist)."""
        self.check(sha256)
        return self.root / _PARTIAL_DIR / sha256

    def exists(self, sha256: str) -> bool:
        """True when the blob is stored."""
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        """Size of a stored blob; NotFound when missing."""
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"artifact {sha256} not found", metadata={"sha256": sha256}) from None

    def touch(self, sha256: str) -> None:
        """Mark a stored blob as used now, so retention counts its age from here."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(sha256))

    def status(self, sha256: str) -> tuple[bool, int]:
        """(complete, received_bytes): stored whole, or how much of an upload was kept.

        A complete blob is touched: whoever asks is about to refer to it.
        """
        if self.exists(sha256):
            self.touch(sha256)
            return True, 0
        try:
            return False, self.partial_path(sha256).stat().st_size
        except FileNotFoundError:
            return False, 0

    def writer(
        self,
        sha256: str,
        size_bytes: int,
        *,
        purpose: Purpose | int = Purpose.DEFAULT,
        offset: int = 0,
    ) -> _Writer:
        """Start (``offset`` 0) or resume (``offset`` = the kept bytes) an upload.

        Checks the declared size against the purpose's limit first. Offset 0 always
        starts afresh (dropping what an earlier try kept); any other offset must equal
        the bytes kept, else FailedPrecondition ``UPLOAD_OFFSET_MISMATCH`` with
        ``received_bytes`` in its metadata. After a resume the writer's hash must be
        brought up to date with :meth:`_Writer.rehash` (reads the kept bytes).
        """
        self.check(sha256)
        if size_bytes <= 0:
            raise InvalidArgument.of([FieldViolation("size_bytes", "must be positive")])
        limit = self.limit_for(purpose)
        if size_bytes > limit:
            what = Purpose(purpose).name.lower() if purpose else "archive"
            raise ResourceExhausted(
                f"{what} of {size_bytes} bytes is over the limit of {limit} bytes",
                reason="ARTIFACT_TOO_LARGE",
                metadata={"limit_bytes": str(limit)},
            )
        if not 0 <= offset <= size_bytes:
            raise InvalidArgument.of(
                [FieldViolation("offset", f"must be between 0 and size_bytes ({size_bytes})")]
            )
        if sha256 in self._active:
            raise FailedPrecondition(
                f"artifact {sha256} is being uploaded by another call; retry shortly",
                reason="UPLOAD_IN_PROGRESS",
                metadata={"sha256": sha256},
            )
        partial = self.partial_path(sha256)
        if offset:
            kept = partial.stat().st_size if partial.is_file() else 0
            if offset != kept:
                raise FailedPrecondition(
                    f"upload of {sha256} resumes at offset {offset}, "
                    f"but the broker kept {kept} bytes",
                    reason="UPLOAD_OFFSET_MISMATCH",
                    metadata={"received_bytes": str(kept), "sha256": sha256},
                )
        if not offset:
            partial.unlink(missing_ok=True)  # a fresh start drops what an earlier try kept
        free = shutil.disk_usage(self.root).free
        if size_bytes - offset > free:
            need = size_bytes - offset
            raise _store_full(self.root, sha256, f"{free} bytes free, the upload needs {need}")
        return _Writer(self, sha256, size_bytes, offset)

    def read(self, sha256: str, offset: int = 0) -> Iterator[bytes]:
        """Stream a blob in chunks from ``offset``; NotFound when missing."""
        path = self.path(sha256)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise NotFound(f"artifact {sha256} not found", metadata={"sha256": sha256}) from None
        with f:
            f.seek(offset)
            while chunk := f.read(CHUNK_BYTES):
                yield chunk

    # --- retention ------------------------------------------------------------------

    def expired(self, older_than: float, partials_older_than: float) -> list[Path]:
        """Blobs last modified before ``older_than`` and interrupted uploads untouched since
        ``partials_older_than`` (Unix times): the candidates for :meth:`collect`.

        Only reads the directory; safe to run in a thread.
        """
        found: list[Path] = []
        for sub in self.root.iterdir():
            if sub.name == _PARTIAL_DIR:
                cutoff = partials_older_than
            elif len(sub.name) == 2 and sub.is_dir():
                cutoff = older_than
            else:
                continue
            with os.scandir(sub) as entries:
                for entry in entries:
                    try:
                        if _is_sha(entry.name) and entry.stat().st_mtime < cutoff:
                            found.append(Path(entry.path))
                    except FileNotFoundError:
                        continue
        return found

    def collect(
        self,
        candidates: Iterable[Path],
        keep: set[str],
        older_than: float,
        partials_older_than: float,
    ) -> Collected:
        """Remove the candidates (from :meth:`expired`) that ``keep`` does not name.

        Ages are checked again (a blob touched since the scan stays), and an upload in
        progress is never removed.
        """
        blobs = partials = size = 0
        for path in candidates:
            sha = path.name
            partial = path.parent.name == _PARTIAL_DIR
            if sha in keep or sha in self._active:
                continue
            try:
                st = path.stat()
                if st.st_mtime >= (partials_older_than if partial else older_than):
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            size += st.st_size
            if partial:
                partials += 1
            else:
                blobs += 1
        return Collected(blobs, partials, size)


class _Writer:
    """One upload into ``.partial/<sha256>``, renamed into place once whole and verified."""

    def __init__(self, store: ArtifactStore, sha256: str, size_bytes: int, offset: int) -> None:
        self.store, self.sha256, self.size_bytes = store, sha256, size_bytes
        self.hash = hashlib.sha256()
        self.written = offset
        self.tmp = store.partial_path(sha256)
        try:
            # Unbuffered: a full disk fails the write() that hit it, not a later close().
            self.file = self.tmp.open("r+b" if offset else "wb", buffering=0)
        except OSError as err:
            if err.errno in _FULL:
                raise _store_full(store.root, sha256, err.strerror or str(err)) from err
            raise
        self.file.seek(offset)
        self.file.truncate()
        self._stale_hash = offset > 0
        store._active.add(sha256)
        self.closed = False

    def rehash(self) -> None:
        """Hash the bytes kept by an earlier try (blocking: run it in a thread)."""
        if not self._stale_hash:
            return
        with self.tmp.open("rb") as f:
            remaining = self.written
            while remaining:
                chunk = f.read(min(CHUNK_BYTES * 8, remaining))
                if not chunk:
                    break
                self.hash.update(chunk)
                remaining -= len(chunk)
        self._stale_hash = False

    def write(self, data: bytes) -> None:
        """Append the next bytes; InvalidArgument past the declared size (the upload is dropped)."""
        assert not self._stale_hash, "rehash() first"
        if self.written + len(data) > self.size_bytes:
            self.discard()
            raise InvalidArgument.of(
                [FieldViolation("data", f"more bytes than the declared {self.size_bytes}")]
            )
        self.written += len(data)
        self.hash.update(data)
        try:
            view = memoryview(data)
            while view:
                view = view[self.file.write(view) :]
        except OSError as err:
            raise self._failed(err) from err

    def commit(self) -> None:
        """Store the blob if it is whole and hashes right; a wrong hash drops what was kept."""
        assert not self._stale_hash, "rehash() first"
        try:
            os.fsync(self.file.fileno())  # a disk that fills late says so here, not after
            self._close()
        except OSError as err:
            raise self._failed(err) from err
        if self.written != self.size_bytes:
            # Kept: the client may resume (GetUploadStatus says how much arrived).
            raise InvalidArgument.of(
                [FieldViolation("size_bytes", f"declared {self.size_bytes}, got {self.written}")]
            )
        if self.hash.hexdigest() != self.sha256:
            self.tmp.unlink(missing_ok=True)
            raise InvalidArgument.of(
                [FieldViolation("sha256", f"content hashes to {self.hash.hexdigest()}")]
            )
        dest = self.store.path(self.sha256)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp, dest)
        except OSError as err:
            raise self._failed(err) from err
        with contextlib.suppress(OSError):
            os.utime(dest)  # its age counts from now

    def _failed(self, err: OSError) -> Exception:
        """A write, sync or rename failed: drop the upload and what it wrote (never resumed:
        it may hold less than was hashed); the error to raise."""
        with contextlib.suppress(OSError):
            self.discard()
        if err.errno in _FULL:
            return _store_full(self.store.root, self.sha256, err.strerror or str(err))
        return err

    def keep(self) -> None:
        """The stream broke: keep what arrived, so the upload can resume from there."""
        self._close()

    def discard(self) -> None:
        """Drop the upload and what it kept."""
        try:
            self._close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.file.close()
            finally:
                self.store._active.discard(self.sha256)
