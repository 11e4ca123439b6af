"""Working directories and checkpoints through the scripted broker's ArtifactService
(``scripted_broker.py``): an archive fetched, verified and shared by the attempts that
use it; checkpoints uploaded while the job runs and restored into its next attempt."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
from scripted_broker import PY, FakeBroker, run_session, script, until

import worker_agent.checkpoints
from harness.agent_fixtures import make_assignment
from worker_agent.agent import Agent


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_working_dir_is_fetched_verified_and_used(tmp_path: Path) -> None:
    good = _tar_gz({"train.py": b"print(open('data.txt').read())", "data.txt": b"from the archive"})
    sha = hashlib.sha256(good).hexdigest()
    bad_sha = hashlib.sha256(b"something else").hexdigest()

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.artifacts[sha] = good
        fake.artifacts[bad_sha] = good  # the bytes do not match the digest
        fake.push(
            assignment=make_assignment("jobs/w", command=[PY, "train.py"], working_dir_sha256=sha)
        )
        fake.push(
            assignment=make_assignment(
                "jobs/x", gpus=[1], command=[PY, "train.py"], working_dir_sha256=bad_sha
            )
        )
        fake.push(assignment=make_assignment("jobs/y", gpus=[2], working_dir_sha256="ab" * 32))
        await until(lambda: all(fake.finished(j) for j in ("jobs/w", "jobs/x", "jobs/y")))

    fake = run_session(tmp_path, body)
    assert fake.output("jobs/w") == "from the archive\n"
    x = fake.finished("jobs/x")
    assert x is not None and x.exit_code == 127 and "digest mismatch" in x.message
    assert fake.kinds("jobs/x") == ["preparing", "finished"]
    y = fake.finished("jobs/y")
    assert y is not None and y.exit_code == 127 and "NOT_FOUND" in y.message
    assert not list((tmp_path / "agent" / "attempts").iterdir())  # cleaned up


def test_attempts_sharing_an_archive_download_it_once(tmp_path: Path) -> None:
    archive = _tar_gz({"train.py": b"print('shared')"})
    sha = hashlib.sha256(archive).hexdigest()
    names = [f"jobs/s{i}" for i in range(4)]

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.artifacts[sha] = archive
        for i, name in enumerate(names):
            a = make_assignment(name, gpus=[i], command=[PY, "train.py"], working_dir_sha256=sha)
            fake.push(assignment=a)
        await until(lambda: all(fake.finished(n) for n in names))

    fake = run_session(tmp_path, body)
    assert [fake.output(n) for n in names] == ["shared\n"] * 4
    assert fake.downloads == 1


def marker_looks(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The directories whose ``.rigshift-complete`` the agent's checkpoint watcher looked at,
    one entry a look: the first comes once it took what the directory holds as uploaded."""
    looks: list[Path] = []
    real = worker_agent.checkpoints.read_marker

    def counted(directory: Path) -> object:
        looks.append(Path(directory))
        return real(directory)

    monkeypatch.setattr(worker_agent.checkpoints, "read_marker", counted)
    return looks


def test_checkpoints_are_uploaded_when_they_change_and_restored_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job writes each checkpoint when the test says, and ends when told: the test waits
    # for each upload, not for a time it hopes is long enough.
    gate = tmp_path / "gate"
    gate.mkdir()
    writer = script(
        "import os, time",
        "d = os.environ['RIGSHIFT_CHECKPOINT_DIR']",
        "def wait(name):",
        "    deadline = time.monotonic() + 60",
        f"    while not os.path.exists(os.path.join({str(gate)!r}, name)):",
        "        assert time.monotonic() < deadline, 'never told to ' + name",
        "        time.sleep(0.02)",
        "for epoch in (1, 2):",
        "    wait(f'write-{epoch}')",
        "    open(os.path.join(d, 'tmp'), 'w').write(f'epoch {epoch}')",
        "    os.replace(os.path.join(d, 'tmp'), os.path.join(d, 'ckpt.txt'))",
        "wait('exit')",
    )
    reader = script(
        "import os; print(open(os.environ['RIGSHIFT_CHECKPOINT_DIR'] + '/ckpt.txt').read())"
    )
    ckpt = tmp_path / "agent" / "checkpoints" / "k"
    looks = marker_looks(monkeypatch)

    async def body(fake: FakeBroker, agent: Agent) -> None:
        def uploaded() -> int:
            return sum(e.HasField("checkpoint") for e in fake.applied.get(("jobs/k", 1), []))

        fake.push(assignment=make_assignment("jobs/k", command=writer))
        # What the directory holds when the watcher starts counts as uploaded (a restored
        # checkpoint), and it starts after the process: the job writes once it has looked.
        await until(lambda: ckpt in looks, what="the checkpoint watcher's first look")
        for epoch in (1, 2):
            (gate / f"write-{epoch}").touch()
            await until(lambda n=epoch: uploaded() >= n, what=f"checkpoint {epoch} uploaded")
        (gate / "exit").touch()
        await until(lambda: fake.finished("jobs/k"), what="the writer")
        events = [e for e in fake.applied[("jobs/k", 1)] if e.HasField("checkpoint")]
        assert len(events) == 2
        last = events[-1].checkpoint
        assert last.size_bytes == len(fake.artifacts[last.sha256])
        # The job succeeded, so its local checkpoint directory is gone: like another rig.
        assert not (tmp_path / "agent" / "checkpoints" / "k").exists()
        again = make_assignment("jobs/k", attempt=2, command=reader)
        again.checkpoint_sha256 = last.sha256
        fake.push(assignment=again)
        await until(lambda: fake.finished("jobs/k", 2), what="the reader")

    fake = run_session(
        tmp_path, body, checkpoint_scan_interval_s=0.2, checkpoint_min_interval_s=0.2
    )
    kinds = fake.kinds("jobs/k")
    assert kinds.index("checkpoint") > kinds.index("started")
    assert kinds[-1] == "finished"
    assert fake.output("jobs/k", 2) == "epoch 2\n"


def test_a_checkpoint_that_cannot_be_restored_does_not_fail_the_job(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/r2", attempt=2, command=script("print('fresh start')"))
        a.checkpoint_sha256 = "cd" * 32  # the broker no longer has it
        fake.push(assignment=a)
        await until(lambda: fake.finished("jobs/r2", 2), what="finished")

    fake = run_session(tmp_path, body)
    assert fake.finished("jobs/r2", 2).exit_code == 0  # type: ignore[union-attr]
    out = fake.output("jobs/r2", 2)
    assert out.startswith("[rigshift-agent: checkpoint cdcdcdcdcdcd not restored")
    assert out.endswith("fresh start\n")
