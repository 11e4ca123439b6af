"""Checkpoint uploads (``worker_agent/checkpoints.py``) against real writer processes on a
real directory: the rate bound whatever the job's cadence, snapshots of one instant, the
``checkpoint_complete()`` signal (``rigshift/checkpoint.py``; job code imports it from
``client.checkpoint``). The uploader is a plain function that keeps what it is given, as
the broker's artifact store would."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import worker_agent.checkpoints
from rigshift.checkpoint import MARKER, checkpoint_complete, directory_state, read_marker
from worker_agent.checkpoints import Baseline, CheckpointWatcher, baseline, snapshot
from worker_agent.outbox import Outbox

pytestmark = pytest.mark.timeout(120)

KEY = ("jobs/c", 1)

#: Rewrites model.txt and step.txt (each atomically, by rename) every PERIOD seconds, with
#: the same step number in both; signals completion after each pair when SIGNAL is "1".
WRITER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[4])
from client.checkpoint import checkpoint_complete
d, period, signal = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
for step in range(1, 1_000_000):
    for name in ("model.txt", "step.txt"):
        tmp = os.path.join(d, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{step}\n" + ("x" * 20000 if name == "model.txt" else ""))
        os.replace(tmp, os.path.join(d, name))
    if signal:
        checkpoint_complete(d)
    time.sleep(period)
"""

REPO = str(Path(__file__).resolve().parents[2])


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def steps(data: bytes) -> dict[str, int]:
    """The step number in each file of an uploaded archive."""
    return {
        name: int(body.split(b"\n", 1)[0]) for name, body in members(data).items() if body.strip()
    }


class Keeper:
    """The uploader: keeps each archive with the monotonic time its upload began."""

    def __init__(self) -> None:
        self.uploads: list[tuple[float, str, bytes]] = []

    async def __call__(self, sha256: str, data: bytes) -> None:
        assert hashlib.sha256(data).hexdigest() == sha256
        self.uploads.append((time.monotonic(), sha256, data))


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    procs: list[subprocess.Popen[bytes]] = []

    def start(directory: Path, period_s: float, *, signal: bool) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-c", WRITER, str(directory), str(period_s), "1" if signal else ""]
        proc = subprocess.Popen([*argv, REPO])
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def count_marker_looks(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The directories whose ``.rigshift-complete`` a CheckpointWatcher looked at, one entry
    a look: the first follows its taking what the directory holds as uploaded, then one
    each turn (its poll). Lets a test wait for the watcher's turns instead of a time."""
    looks: list[Path] = []
    real = worker_agent.checkpoints.read_marker

    def counted(directory: Path) -> object:
        looks.append(Path(directory))
        return real(directory)

    monkeypatch.setattr(worker_agent.checkpoints, "read_marker", counted)
    return looks


def watch_until(
    directory: Path,
    count: int,
    *,
    min_interval_s: float,
    interval_s: float = 0.05,
    start: Baseline | None = None,
):
    """Run a watcher on ``directory`` until ``count`` uploads (at most 60 s); the uploads and
    the outbox's checkpoint events."""
    keeper = Keeper()
    outbox = Outbox()

    async def main() -> None:
        watcher = CheckpointWatcher(
            keeper, outbox, asyncio.Event(), interval_s=interval_s, max_bytes=1 << 20
        )
        task = asyncio.create_task(
            watcher.watch(KEY, directory, min_interval_s=min_interval_s, start=start)
        )
        deadline = time.monotonic() + 60
        while len(keeper.uploads) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    return keeper.uploads, outbox


def test_a_checkpoint_that_never_stays_still_is_uploaded_at_a_bounded_rate(
    tmp_path: Path, writer
) -> None:  # type: ignore[no-untyped-def]
    ckpt = tmp_path / "checkpoints" / "c"
    ckpt.mkdir(parents=True)
    writer(ckpt, 0.02, signal=False)  # rewrites both files 50 times a second
    uploads, outbox = watch_until(ckpt, 4, min_interval_s=0.5)
    assert len(uploads) >= 4  # the old rule (unchanged for a whole scan) uploaded nothing
    starts = [t for t, _, _ in uploads]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.5, gaps  # never more than once per min_interval_s
    for _, _, data in uploads:  # each file whole: written by rename, linked, then packed
        got = members(data)
        assert set(got) == {"model.txt", "step.txt"}
        assert len(got["model.txt"].split(b"\n", 1)[1]) == 20000
    events = outbox.batch()
    assert [e.checkpoint.sha256 for e in events] == [sha for _, sha, _ in uploads]
    assert not (ckpt.parent / ".c.snapshot").exists()  # the links are gone


def test_a_signalled_checkpoint_is_uploaded_whole_and_only_when_signalled(
    tmp_path: Path, writer
) -> None:  # type: ignore[no-untyped-def]
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    writer(ckpt, 0.05, signal=True)
    uploads, _ = watch_until(ckpt, 4, min_interval_s=0.3)
    gaps = [b - a for (a, _, _), (b, _, _) in itertools.pairwise(uploads)]
    assert min(gaps) >= 0.3, gaps
    for _, _, data in uploads:
        got = steps(data)
        assert MARKER not in got and set(got) == {"model.txt", "step.txt"}
        assert got["model.txt"] == got["step.txt"]  # one checkpoint, never half old half new


def test_the_signal_names_the_files_and_a_moved_on_directory_is_not_taken(
    tmp_path: Path,
) -> None:
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    assert checkpoint_complete(ckpt) == 1  # an empty checkpoint is a checkpoint too
    (ckpt / "a").write_text("1")
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "b").write_text("1")
    (ckpt / "empty").mkdir()
    assert checkpoint_complete(ckpt) == 2
    marker = read_marker(ckpt)
    assert marker is not None and marker[0] == 2
    assert marker[1] == directory_state(ckpt)
    assert [f[0] for f in marker[1]] == ["a", "sub/b"]  # the marker itself is not listed

    snap = snapshot(ckpt, tmp_path / "scratch", max_bytes=1 << 20, expect=marker[1])
    assert snap is not None and members(snap.data) == {"a": b"1", "sub/b": b"1"}
    with tarfile.open(fileobj=io.BytesIO(snap.data), mode="r:gz") as tar:
        assert tar.getnames() == ["a", "empty", "sub", "sub/b"]  # as the directory is
    assert not (tmp_path / "scratch").exists()

    tmp = ckpt / "a.tmp"  # the job starts its next checkpoint before the agent looked
    tmp.write_text("2")
    os.replace(tmp, ckpt / "a")
    assert snapshot(ckpt, tmp_path / "scratch", max_bytes=1 << 20, expect=marker[1]) is None
    assert checkpoint_complete(ckpt) == 3


def test_outside_rigshift_the_signal_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RIGSHIFT_CHECKPOINT_DIR", raising=False)
    assert checkpoint_complete() == 0


def test_a_restored_checkpoint_counts_as_uploaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    (ckpt / "model.txt").write_text("restored")
    checkpoint_complete(ckpt)  # a signal left by an earlier attempt on this rig
    keeper = Keeper()
    looks = count_marker_looks(monkeypatch)

    async def main() -> None:
        watcher = CheckpointWatcher(
            keeper, Outbox(), asyncio.Event(), interval_s=0.05, max_bytes=1 << 20
        )
        task = asyncio.create_task(watcher.watch(KEY, ckpt, min_interval_s=0.1))
        # The watcher's first look at the marker comes once it took the directory as it is;
        # an upload decided on its second look is done before its third.
        deadline = time.monotonic() + 30
        while len(looks) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(looks) >= 3, "the watcher did not look at the marker three times"
        assert keeper.uploads == []  # nothing new
        (ckpt / "model.txt").write_text("trained")
        checkpoint_complete(ckpt)
        deadline = time.monotonic() + 30
        while not keeper.uploads and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert [members(d) for _, _, d in keeper.uploads] == [{"model.txt": b"trained"}]


def test_a_checkpoint_written_before_the_watcher_looks_is_uploaded(tmp_path: Path) -> None:
    # The agent takes the directory's baseline before it launches the job and starts the
    # watcher once the process runs: a job that checkpoints in its first instant wrote
    # before the watcher's first look, and that checkpoint is still the job's own.
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    start = baseline(ckpt)  # before the launch: nothing
    (ckpt / "model.txt").write_text("epoch 1")
    uploads, _ = watch_until(ckpt, 1, min_interval_s=0.05, start=start)
    assert [members(d) for _, _, d in uploads] == [{"model.txt": b"epoch 1"}]
