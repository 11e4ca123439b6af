"""Archives moving between the client and the broker: uploads (working directories,
inputs) and downloads (job outputs).

Uploads are resumable and deduplicated: the broker is asked what it has of an
archive first, and a broken stream resumes from the bytes it kept. Downloads
resume at the bytes already written, are checked against their sha256, and are
unpacked into a new directory that appears whole or not at all. Archives are
built the same way the agent builds them (deterministic tar.gz).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import grpc

from client.connection import RETRY_BASE_DELAY_S, Connection
from client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    Unavailable,
    from_rpc_error,
)
from client.messages import check_input_name, resource_name
from rigshift.archive import ArchiveError, pack_directory, safe_extract
from rigshift.v1 import artifact_service_pb2, job_service_pb2

__all__ = [
    "MAX_INPUT_BYTES",
    "MAX_UPLOAD_BYTES",
    "Progress",
    "TransferMethods",
    "build_input_archive",
    "build_working_dir_archive",
]

#: Largest working-directory archive the client will upload.
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
#: Largest input archive the client will upload (the broker's default limit).
MAX_INPUT_BYTES = 10 * 1024**3
_CHUNK_BYTES = 1024 * 1024
_TRANSFER_TRIES = 5
"""Tries of an upload or download in a row that move no byte forward before giving up."""
_MIN_UPLOAD_BYTES_PER_S = 512 * 1024
"""An upload's deadline assumes at least this rate; past it, the upload resumes."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: ``progress(done_bytes, total_bytes)``, called as a transfer moves (e.g. a ProgressBar).
Progress = Callable[[int, int], None]


def build_working_dir_archive(path: str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """Pack a directory into a deterministic tar.gz, in memory.

    Entries are sorted and stripped of mtimes, owners and the gzip timestamp,
    so the same tree always gives the same bytes (and sha256). Raises
    InvalidArgument when ``path`` is not a directory or the archive grows past
    ``max_bytes``.
    """
    root = Path(path)
    if not root.is_dir():
        raise InvalidArgument(
            f"working_dir: not a directory: {str(root)!r}",
            reason="WORKING_DIR_NOT_A_DIRECTORY",
            field_violations=[("working_dir", "not a directory")],
        )
    try:
        return pack_directory(root, max_bytes=max_bytes)  # the same bytes the agent packs
    except ArchiveError as err:
        raise InvalidArgument(
            f"working_dir: archive of {str(root)!r} is over the {max_bytes} byte limit",
            reason="WORKING_DIR_TOO_LARGE",
            metadata={"max_bytes": str(max_bytes)},
            field_violations=[("working_dir", f"archive larger than {max_bytes} bytes")],
        ) from err


def build_input_archive(path: str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """Pack an input into a deterministic tar.gz, in memory.

    A directory packs its contents (the job finds them under
    ``$RIGSHIFT_INPUT_DIR/NAME/``); a single file packs as that file under its own
    name (``$RIGSHIFT_INPUT_DIR/NAME/<filename>``). The archive is built in memory,
    so an input needs that much free RAM. InvalidArgument when ``path`` is neither,
    or the archive grows past ``max_bytes``.
    """
    src = Path(path)
    try:
        if src.is_dir():
            return pack_directory(src, max_bytes=max_bytes)
        if not src.is_file():
            raise InvalidArgument(
                f"input: not a file or directory: {str(src)!r}",
                reason="INPUT_NOT_FOUND",
                field_violations=[("inputs", "not a file or directory")],
            )
        with tempfile.TemporaryDirectory(prefix="rigshift-input-") as tmp:
            staged = Path(tmp) / src.name
            try:
                os.link(src, staged)  # no copy when the temp dir shares the file system
            except OSError:
                shutil.copyfile(src, staged)
                shutil.copymode(src, staged)
            return pack_directory(Path(tmp), max_bytes=max_bytes)
    except ArchiveError as err:
        raise InvalidArgument(
            f"input: archive of {str(src)!r} is over the {max_bytes} byte limit",
            reason="INPUT_TOO_LARGE",
            metadata={"max_bytes": str(max_bytes)},
            field_violations=[("inputs", f"archive larger than {max_bytes} bytes")],
        ) from err


def _check_download_dir(dest: Path) -> None:
    """Refuse a destination that exists and is not an empty directory."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidArgument(
            f"{str(dest)!r} exists and is not an empty directory; "
            "download into a new or empty directory",
            reason="DOWNLOAD_DIR_NOT_EMPTY",
            field_violations=[("dir", "exists and is not empty")],
        )


class TransferMethods(Connection):
    """Uploads and downloads of :class:`client.sdk.Client`."""

    def upload_working_dir(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = MAX_UPLOAD_BYTES,
        progress: Progress | None = None,
    ) -> str:
        """Pack ``path`` as a deterministic tar.gz, upload it and return its hex sha256.

        Pass the result as ``working_dir_sha256`` to :meth:`create_job`. The
        archive is refused locally (InvalidArgument) when over ``max_bytes``;
        an archive the broker already has is not sent again (see :meth:`upload_archive`).
        """
        data = build_working_dir_archive(path, max_bytes=max_bytes)
        return self.upload_archive(data, progress=progress)

    def upload_input(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = MAX_INPUT_BYTES,
        progress: Progress | None = None,
    ) -> str:
        """Pack a file or directory as job input (:func:`build_input_archive`), upload it
        with purpose INPUT and return its hex sha256, for ``create_job(inputs={name: sha})``.
        """
        data = build_input_archive(path, max_bytes=max_bytes)
        return self.upload_archive(data, purpose=artifact_service_pb2.INPUT, progress=progress)

    def upload_archive(
        self,
        data: bytes,
        *,
        purpose: int = artifact_service_pb2.ARTIFACT_PURPOSE_UNSPECIFIED,
        progress: Progress | None = None,
    ) -> str:
        """Upload an archive unless the broker has it already; return its hex sha256.

        Asks GetUploadStatus first: a stored archive is not sent again, and an
        interrupted upload resumes from the bytes the broker kept. A broken connection
        (UNAVAILABLE, a deadline) is retried with backoff, each time from the broker's
        count, until five tries in a row move nothing forward. ``purpose`` is an
        ``ArtifactPurpose`` (its limit applies); ``progress(done, total)`` follows it.
        """
        digest = hashlib.sha256(data).hexdigest()
        total = len(data)
        failures, restarted, best = 0, False, -1
        while True:
            offset = 0
            try:
                status = self._upload_status(digest)
                if status is not None and status.complete:
                    if progress is not None:
                        progress(total, total)
                    return digest
                if status is not None and status.received_bytes <= total and not restarted:
                    offset = status.received_bytes
                if offset > best:
                    best, failures = offset, 0  # the broker kept more than before
                self._send_archive(data, digest, offset, purpose, progress)
                return digest
            except (Unavailable, DeadlineExceeded):
                pass
            except FailedPrecondition as err:  # raced with another upload of the same bytes
                if err.reason not in ("UPLOAD_OFFSET_MISMATCH", "UPLOAD_IN_PROGRESS"):
                    raise
            except InvalidArgument:
                if offset == 0 or restarted:
                    raise
                restarted = True  # what the broker kept did not fit our bytes: start over
                continue
            restarted = False
            failures += 1
            if failures >= _TRANSFER_TRIES:
                raise Unavailable(
                    f"upload of {digest} made no progress in {_TRANSFER_TRIES} tries",
                    reason="UPLOAD_STALLED",
                    metadata={"sha256": digest},
                )
            time.sleep(RETRY_BASE_DELAY_S * 2 ** min(failures, 5))

    def _upload_status(self, digest: str) -> artifact_service_pb2.UploadStatus | None:
        """The broker's UploadStatus; None from a broker that cannot resume uploads."""
        request = artifact_service_pb2.GetUploadStatusRequest(sha256=digest)
        try:
            return self._unary(self._artifacts.GetUploadStatus, request)
        except InternalError as err:
            if err.code == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise

    def _send_archive(
        self, data: bytes, digest: str, offset: int, purpose: int, progress: Progress | None
    ) -> None:
        """One UploadArtifact stream of ``data[offset:]``."""
        total = len(data)

        def chunks() -> Iterator[artifact_service_pb2.UploadArtifactRequest]:
            pos = offset
            if progress is not None:
                progress(pos, total)
            while True:
                piece = data[pos : pos + _CHUNK_BYTES]
                if pos == offset:
                    yield artifact_service_pb2.UploadArtifactRequest(
                        sha256=digest,
                        size_bytes=total,
                        offset=offset,
                        purpose=cast(Any, purpose),
                        data=piece,
                    )
                else:
                    yield artifact_service_pb2.UploadArtifactRequest(data=piece)
                pos += len(piece)
                if progress is not None:
                    progress(pos, total)
                if pos >= total:
                    return

        timeout = self.timeout_s + (total - offset) / _MIN_UPLOAD_BYTES_PER_S
        try:
            artifact = self._artifacts.UploadArtifact(
                chunks(), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        if artifact.sha256 and artifact.sha256 != digest:
            raise InternalError(
                f"broker stored sha256 {artifact.sha256}, expected {digest}",
                code=grpc.StatusCode.DATA_LOSS,
                reason="ARTIFACT_DIGEST_MISMATCH",
            )

    def _resolve_inputs(self, inputs: Mapping[str, str | os.PathLike[str]]) -> dict[str, str]:
        """name -> sha256, uploading the inputs given as paths."""
        out = {}
        for name, value in inputs.items():
            check_input_name(name)
            if isinstance(value, os.PathLike):
                out[name] = self.upload_input(value)
            elif isinstance(value, str) and _SHA256.match(value):
                out[name] = value
            else:
                raise InvalidArgument(
                    f"input {name!r}: expected a Path or the sha256 upload_input() returned, "
                    f"got {value!r}",
                    reason="INVALID_INPUT",
                    field_violations=[(f"spec.inputs[{name!r}]", "a Path or a hex sha256")],
                )
        return out

    def download_outputs(
        self,
        job: str,
        dir: str | os.PathLike[str],
        attempt: int = 0,
        *,
        progress: Progress | None = None,
    ) -> Path:
        """Download an attempt's output (0: the latest kept one) and unpack it into ``dir``.

        ``dir`` must not exist or be empty (else InvalidArgument,
        ``DOWNLOAD_DIR_NOT_EMPTY``). The archive is fetched next to it, resuming a
        broken stream where it stopped, checked against its sha256 and unpacked into
        a temporary directory that is then renamed to ``dir``: an interrupted
        download leaves no half-filled ``dir``. Returns ``dir``. The broker answers
        NotFound (``NO_OUTPUT``, ``OUTPUT_EXPIRED``) or FailedPrecondition
        (``OUTPUT_OVER_LIMIT``) when there is nothing to fetch.
        """
        name = resource_name("jobs", job, "job")
        dest = Path(dir)
        _check_download_dir(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.download-", dir=dest.parent))
        try:
            archive = work / "output.tar.gz"
            self._fetch_output(name, attempt, archive, progress)
            tree = work / "tree"
            try:
                safe_extract(archive, tree)
            except (ArchiveError, tarfile.TarError) as err:
                raise InternalError(
                    f"the output archive of {name} cannot be unpacked: {err}",
                    code=grpc.StatusCode.DATA_LOSS,
                    reason="OUTPUT_ARCHIVE_INVALID",
                ) from err
            _check_download_dir(dest)  # again: something may have appeared meanwhile
            os.replace(tree, dest)  # atomic; replaces an empty directory
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return dest

    def _fetch_output(
        self, name: str, attempt: int, archive: Path, progress: Progress | None
    ) -> None:
        """Stream an output archive into ``archive``, resuming at the bytes already written."""
        digest = hashlib.sha256()
        sha256, size, got, failures = "", -1, 0, 0
        with archive.open("wb") as f:
            while True:
                request = job_service_pb2.DownloadJobOutputRequest(
                    name=name, attempt=attempt, offset=got
                )
                before = got
                try:
                    for chunk in self._stream(self._jobs.DownloadJobOutput, request):
                        if chunk.sha256:
                            if sha256 and chunk.sha256 != sha256:
                                raise InternalError(
                                    f"the output of {name} changed while it was downloaded",
                                    code=grpc.StatusCode.DATA_LOSS,
                                    reason="OUTPUT_CHANGED",
                                )
                            sha256, size = chunk.sha256, chunk.size_bytes
                            attempt = chunk.attempt  # a resume asks for this very attempt
                            if progress is not None:
                                progress(got, size)
                        f.write(chunk.data)
                        digest.update(chunk.data)
                        got += len(chunk.data)
                        if progress is not None:
                            progress(got, size)
                    break
                except (Unavailable, DeadlineExceeded):
                    failures = 0 if got > before else failures + 1
                    if failures >= _TRANSFER_TRIES:
                        raise
                    time.sleep(RETRY_BASE_DELAY_S * 2 ** min(failures, 5))
        if got != size or digest.hexdigest() != sha256:
            raise InternalError(
                f"the output of {name} arrived as {got} bytes hashing to "
                f"{digest.hexdigest()}, expected {size} bytes with sha256 {sha256}",
                code=grpc.StatusCode.DATA_LOSS,
                reason="OUTPUT_DIGEST_MISMATCH",
            )
