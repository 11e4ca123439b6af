"""Artifact retention: the pure reference set, and a collection over a real store directory."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from broker.artifacts import ArtifactStore
from broker.core import Attempt, AttemptOutput, BrokerCore, HistoryEntry, Job
from broker.model import JobSpec, JobState
from broker.retention import collect_artifacts, end_time, referenced_artifacts

DAY = 86400.0
NOW = 100 * DAY
RETENTION_S = 30 * DAY


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def make_job(
    job_id: str,
    state: JobState,
    *,
    ended: float | None = None,
    working_dir: str = "",
    inputs: tuple[str, ...] = (),
    checkpoint: str = "",
    outputs: tuple[str, ...] = (),
) -> Job:
    """A job in ``state`` (ended at ``ended`` when final) referring to the given archives."""
    spec = JobSpec(
        command=("train",),
        working_dir_sha256=working_dir,
        inputs=tuple((f"in{i}", s) for i, s in enumerate(inputs)),
    )
    job = Job(job_id, "alice", spec, create_time=0.0, state=state, checkpoint_sha256=checkpoint)
    job.history.append(HistoryEntry(0.0, None, JobState.PENDING, "submitted"))
    if ended is not None:
        job.history.append(HistoryEntry(ended, JobState.RUNNING, state, "done"))
        job.update_time = ended + DAY  # a later change (e.g. a settled attempt) does not count
    for n, out in enumerate(outputs, start=1):
        attempt = Attempt(job_id, n, "w", (0,), 0, 0.0)
        attempt.output = AttemptOutput(out, 10, 0.0)
        job.attempts.append(attempt)
    return job


def core_of(*jobs: Job) -> BrokerCore:
    core = BrokerCore()
    for job in jobs:
        core.jobs[job.job_id] = job
    return core


def test_end_time_is_when_the_job_reached_its_final_state() -> None:
    assert end_time(make_job("a", JobState.RUNNING)) is None
    assert end_time(make_job("b", JobState.SUCCEEDED, ended=5.0)) == 5.0


@pytest.mark.parametrize(
    ("job", "kept"),
    [
        # Not ended: everything it may still need, outputs included.
        (
            make_job(
                "live",
                JobState.RUNNING,
                working_dir=sha("wd"),
                inputs=(sha("in"),),
                checkpoint=sha("ck"),
                outputs=(sha("out"),),
            ),
            {sha("wd"), sha("in"), sha("ck"), sha("out")},
        ),
        (make_job("queued", JobState.PENDING, inputs=(sha("in"),)), {sha("in")}),
        # Ended 29 days ago: within the window; its checkpoint is not needed again.
        (
            make_job(
                "recent",
                JobState.SUCCEEDED,
                ended=NOW - 29 * DAY,
                working_dir=sha("wd"),
                inputs=(sha("in"),),
                checkpoint=sha("ck"),
                outputs=(sha("o1"), ""),  # an attempt that kept nothing
            ),
            {sha("wd"), sha("in"), sha("o1")},
        ),
        # Ended 31 days ago: nothing.
        (
            make_job(
                "old",
                JobState.FAILED,
                ended=NOW - 31 * DAY,
                working_dir=sha("wd"),
                outputs=(sha("o1"),),
            ),
            set(),
        ),
    ],
    ids=lambda v: v.job_id if isinstance(v, Job) else "",
)
def test_referenced_artifacts(job: Job, kept: set[str]) -> None:
    assert referenced_artifacts(core_of(job), NOW, RETENTION_S) == kept


def test_an_archive_is_kept_while_any_job_needs_it() -> None:
    shared = sha("dataset")
    old = make_job("old", JobState.SUCCEEDED, ended=NOW - 90 * DAY, inputs=(shared,))
    new = make_job("new", JobState.PENDING, inputs=(shared,))
    assert referenced_artifacts(core_of(old, new), NOW, RETENTION_S) == {shared}
    assert referenced_artifacts(core_of(old), NOW, RETENTION_S) == set()


def _put(store: ArtifactStore, data: bytes, age_s: float, now: float) -> str:
    """Store ``data`` as a blob last modified ``age_s`` before ``now``."""
    digest = hashlib.sha256(data).hexdigest()
    writer = store.writer(digest, len(data))
    writer.write(data)
    writer.commit()
    os.utime(store.path(digest), (now - age_s, now - age_s))
    return digest


def _partial(store: ArtifactStore, data: bytes, age_s: float, now: float) -> str:
    """Leave an interrupted upload of ``data`` (its first half) ``age_s`` old."""
    digest = hashlib.sha256(data).hexdigest()
    writer = store.writer(digest, len(data))
    writer.write(data[: len(data) // 2])
    writer.keep()
    os.utime(store.partial_path(digest), (now - age_s, now - age_s))
    return digest


def test_collection_removes_only_old_unreferenced_archives(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    now = 1_700_000_000.0
    old = 40 * DAY
    live_wd = _put(store, b"working dir", old, now)
    live_in = _put(store, b"input", old, now)
    live_ck = _put(store, b"checkpoint", old, now)
    kept_out = _put(store, b"output of a job that ended a day ago", old, now)
    expired_out = _put(store, b"output of a job that ended 40 days ago", old, now)
    orphan = _put(store, b"nobody refers to me", old, now)
    young_orphan = _put(store, b"uploaded an hour ago, job not created yet", 3600, now)
    stale_partial = _partial(store, b"abandoned two days ago", 2 * DAY, now)
    fresh_partial = _partial(store, b"interrupted an hour ago", 3600, now)
    core = core_of(
        make_job(
            "live",
            JobState.RUNNING,
            working_dir=live_wd,
            inputs=(live_in,),
            checkpoint=live_ck,
        ),
        make_job("recent", JobState.SUCCEEDED, ended=now - DAY, outputs=(kept_out,)),
        make_job("old", JobState.SUCCEEDED, ended=now - old, outputs=(expired_out,)),
    )

    got = asyncio.run(collect_artifacts(core, store, now, RETENTION_S))

    assert (got.blobs, got.partials) == (2, 1)
    removed = [b"output of a job that ended 40 days ago", b"nobody refers to me"]
    assert got.bytes == sum(map(len, removed)) + len(b"abandoned two days ago") // 2
    for digest in (live_wd, live_in, live_ck, kept_out, young_orphan):
        assert store.exists(digest), digest
    for digest in (expired_out, orphan):
        assert not store.exists(digest), digest
    assert store.status(stale_partial) == (False, 0)
    assert store.status(fresh_partial) == (False, len(b"interrupted an hour ago") // 2)


def test_asking_for_an_archive_refreshes_its_age(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    now = 1_700_000_000.0
    digest = _put(store, b"about to be reused", 40 * DAY, now)
    assert store.status(digest) == (True, 0)  # GetUploadStatus: "complete, don't send it"
    got = asyncio.run(collect_artifacts(core_of(), store, now, RETENTION_S))
    assert got.blobs == 0 and store.exists(digest)
