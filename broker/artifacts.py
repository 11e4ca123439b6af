"""Content-addressed archive store on the local filesystem (uploaded working directories)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from broker.errors import FieldViolation, InvalidArgument, NotFound, ResourceExhausted

__all__ = ["CHUNK_BYTES", "ArtifactStore"]

CHUNK_BYTES = 1 << 20


class ArtifactStore:
    """Blobs under ``root/ab/abcdef…`` named by their sha256; writes are atomic renames."""

    def __init__(self, root: Path | str, max_bytes: int = 100 << 20) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def check(sha256: str, field: str = "sha256") -> str:
        """The name if it is 64 lowercase hex digits, else InvalidArgument (never a path)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise InvalidArgument.of([FieldViolation(field, "must be 64 lowercase hex digits")])
        return sha256

    def path(self, sha256: str) -> Path:
        """Where a blob lives (it may not exist)."""
        self.check(sha256)
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        """True when the blob is stored."""
        return self.path(sha256).is_file()

    def writer(self, sha256: str, size_bytes: int) -> _Writer:
        """Start an upload; check the declared size against the limit first."""
        self.check(sha256)
        if size_bytes <= 0:
            raise InvalidArgument.of([FieldViolation("size_bytes", "must be positive")])
        if size_bytes > self.max_bytes:
            raise ResourceExhausted(
                f"archive of {size_bytes} bytes is over the limit of {self.max_bytes} bytes",
                reason="ARTIFACT_TOO_LARGE",
                metadata={"limit_bytes": str(self.max_bytes)},
            )
        return _Writer(self, sha256, size_bytes)

    def read(self, sha256: str) -> Iterator[bytes]:
        """Stream a blob in chunks; NotFound when missing."""
        path = self.path(sha256)
        if not path.is_file():
            raise NotFound(f"artifact {sha256} not found", metadata={"sha256": sha256})
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk


class _Writer:
    def __init__(self, store: ArtifactStore, sha256: str, size_bytes: int) -> None:
        self.store, self.sha256, self.size_bytes = store, sha256, size_bytes
        self.hash = hashlib.sha256()
        self.written = 0
        fd, name = tempfile.mkstemp(dir=store.root, prefix=".upload-")
        self.file = os.fdopen(fd, "wb")
        self.tmp = Path(name)

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.written > self.size_bytes:
            self.abort()
            raise InvalidArgument.of(
                [FieldViolation("data", f"more bytes than the declared {self.size_bytes}")]
            )
        self.hash.update(data)
        self.file.write(data)

    def commit(self) -> None:
        self.file.close()
        if self.written != self.size_bytes:
            self.tmp.unlink(missing_ok=True)
            raise InvalidArgument.of(
                [FieldViolation("size_bytes", f"declared {self.size_bytes}, got {self.written}")]
            )
        if self.hash.hexdigest() != self.sha256:
            self.tmp.unlink(missing_ok=True)
            raise InvalidArgument.of(
                [FieldViolation("sha256", f"content hashes to {self.hash.hexdigest()}")]
            )
        dest = self.store.path(self.sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.tmp, dest)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)
