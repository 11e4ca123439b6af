"""ArtifactStore on a full disk: a real 2 MiB tmpfs (mount(8), as root; skipped elsewhere)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from disk_helpers import fill, tmpfs

from broker.artifacts import ArtifactStore
from broker.errors import FailedPrecondition, ResourceExhausted


def _blobs(root: Path) -> list[str]:
    """Every file under the store but its partial uploads."""
    return [p.name for p in root.rglob("*") if p.is_file() and p.parent.name != ".partial"]


def test_a_full_disk_refuses_the_upload_and_keeps_nothing(tmp_path: Path) -> None:
    big = os.urandom(600 << 10)
    big_sha = hashlib.sha256(big).hexdigest()
    with tmpfs(tmp_path / "store", "2m") as root:
        store = ArtifactStore(root, 10 << 20)
        # Up front: the declared size does not fit what is free.
        filler = fill(root / "filler", leave=100 << 10)
        with pytest.raises(ResourceExhausted) as exc:
            store.writer(big_sha, len(big))
        assert exc.value.reason == "ARTIFACT_STORE_FULL"
        assert exc.value.message.startswith("the broker's artifact store is full: ")
        assert "bytes free, the upload needs 614400" in exc.value.message
        filler.unlink()

        # Half-way: the disk fills while the upload is being written.
        w = store.writer(big_sha, len(big))
        w.write(big[: 100 << 10])
        filler = fill(root / "filler", leave=50 << 10)
        with pytest.raises(ResourceExhausted) as exc:
            w.write(big[100 << 10 :])
        assert exc.value.reason == "ARTIFACT_STORE_FULL"
        assert "No space left on device" in exc.value.message
        assert store.status(big_sha) == (False, 0)  # nothing kept: no resume into a bad blob
        assert not store.exists(big_sha) and _blobs(root) == ["filler"]
        with pytest.raises(FailedPrecondition):  # a resume finds nothing to resume from
            store.writer(big_sha, len(big), offset=100 << 10)

        # Space is back: the same upload goes through, and only then is the blob there.
        filler.unlink()
        w = store.writer(big_sha, len(big))
        w.write(big)
        assert not store.exists(big_sha)
        w.commit()
        assert store.exists(big_sha) and b"".join(store.read(big_sha)) == big
        assert store.status(big_sha) == (True, 0)
