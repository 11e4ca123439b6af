"""ArtifactStore on a real directory: purposes and limits, resumable uploads, reads. A full
disk (a real 2 MiB tmpfs, mounted by mount(8)) is tests/integration/test_artifact_store_disk.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from broker.artifacts import ArtifactStore, Purpose
from broker.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

DATA = os.urandom(3000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path, 4000, max_input_bytes=5000, max_output_bytes=1000)


@pytest.mark.parametrize(
    ("purpose", "limit"), [(Purpose.DEFAULT, 4000), (Purpose.INPUT, 5000), (Purpose.OUTPUT, 1000)]
)
def test_each_purpose_has_its_limit(store: ArtifactStore, purpose: Purpose, limit: int) -> None:
    assert store.limit_for(purpose) == limit
    store.writer(SHA, limit, purpose=purpose).discard()
    with pytest.raises(ResourceExhausted) as exc:
        store.writer(SHA, limit + 1, purpose=purpose)
    assert (exc.value.reason, exc.value.metadata) == (
        "ARTIFACT_TOO_LARGE",
        {"limit_bytes": str(limit)},
    )


def test_an_interrupted_upload_resumes_from_what_was_kept(store: ArtifactStore) -> None:
    first = store.writer(SHA, len(DATA))
    first.write(DATA[:1000])
    first.keep()  # the stream broke
    assert store.status(SHA) == (False, 1000)
    with pytest.raises(FailedPrecondition) as exc:
        store.writer(SHA, len(DATA), offset=999)
    assert exc.value.reason == "UPLOAD_OFFSET_MISMATCH"
    assert exc.value.metadata["received_bytes"] == "1000"
    second = store.writer(SHA, len(DATA), offset=1000)
    with pytest.raises(FailedPrecondition) as busy:  # one upload of a sha256 at a time
        store.writer(SHA, len(DATA))
    assert busy.value.reason == "UPLOAD_IN_PROGRESS"
    second.rehash()
    second.write(DATA[1000:])
    second.commit()
    assert store.status(SHA) == (True, 0)
    assert b"".join(store.read(SHA)) == DATA
    assert b"".join(store.read(SHA, offset=2500)) == DATA[2500:]
    assert not store.partial_path(SHA).exists()


def test_offset_zero_starts_afresh(store: ArtifactStore) -> None:
    w = store.writer(SHA, len(DATA))
    w.write(b"garbage" * 10)
    w.keep()
    w = store.writer(SHA, len(DATA))
    w.write(DATA)
    w.commit()
    assert store.path(SHA).read_bytes() == DATA


def test_a_short_upload_is_kept_a_wrong_one_dropped(store: ArtifactStore) -> None:
    w = store.writer(SHA, len(DATA))
    w.write(DATA[:10])
    with pytest.raises(InvalidArgument):
        w.commit()
    assert store.status(SHA) == (False, 10)  # resumable
    w = store.writer(SHA, len(DATA), offset=10)
    w.rehash()
    w.write(b"\0" * (len(DATA) - 10))
    with pytest.raises(InvalidArgument) as exc:
        w.commit()
    assert exc.value.violations[0].field == "sha256"
    assert store.status(SHA) == (False, 0)  # what it kept did not hash right: gone


def test_more_bytes_than_declared_drops_the_upload(store: ArtifactStore) -> None:
    w = store.writer(SHA, 10)
    with pytest.raises(InvalidArgument):
        w.write(DATA[:11])
    assert store.status(SHA) == (False, 0)
    store.writer(SHA, 10).discard()  # no longer in progress


@pytest.mark.parametrize(
    ("size", "offset", "field"), [(0, 0, "size_bytes"), (10, 11, "offset"), (10, -1, "offset")]
)
def test_bad_sizes_and_offsets(store: ArtifactStore, size: int, offset: int, field: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        store.writer(SHA, size, offset=offset)
    assert exc.value.violations[0].field == field


def test_names_are_never_paths(store: ArtifactStore) -> None:
    for bad in ("../" + SHA[3:], SHA.upper(), SHA[:63], ""):
        with pytest.raises(InvalidArgument):
            store.status(bad)
