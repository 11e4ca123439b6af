"""The agent's side of inputs and outputs, against the scripted broker of
``scripted_broker`` on a real gRPC port: inputs fetched once per rig and found
read-only at ``$RIGSHIFT_INPUT_DIR/<name>``; ``$RIGSHIFT_OUTPUT_DIR`` archived and
uploaded after the process, whatever its outcome, and never kept in part."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from scripted_broker import FakeBroker, run_session, script, until

from harness.agent_fixtures import make_assignment
from rigshift.archive import pack_directory
from worker_agent.agent import Agent


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def test_outputs_are_uploaded_before_finished_even_when_the_job_fails(tmp_path: Path) -> None:
    write = script(
        "import os, sys",
        "out = os.environ['RIGSHIFT_OUTPUT_DIR']",
        "os.makedirs(os.path.join(out, 'sub'))",
        "open(os.path.join(out, 'model.bin'), 'wb').write(b'weights' * 100)",
        "open(os.path.join(out, 'sub', 'metrics.json'), 'w').write('{}')",
        "sys.exit(3)",
    )

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=make_assignment("jobs/o", command=write, max_output_bytes=1 << 20))
        await until(lambda: fake.finished("jobs/o"), what="the attempt to finish")

    fake = run_session(tmp_path, body)
    kinds = fake.kinds("jobs/o")
    assert kinds[0] == "preparing" and kinds[-2:] == ["output", "finished"]
    out = next(e.output for e in fake.applied[("jobs/o", 1)] if e.HasField("output"))
    assert not out.over_limit and out.sha256 in fake.artifacts
    data = fake.artifacts[out.sha256]
    assert hashlib.sha256(data).hexdigest() == out.sha256 and len(data) == out.size_bytes
    assert _members(data) == {"model.bin": b"weights" * 100, "sub/metrics.json": b"{}"}
    assert fake.finished("jobs/o").exit_code == 3
    assert not (tmp_path / "agent" / "outputs" / "o-1").exists()  # cleaned up


def test_an_output_over_the_limit_is_not_uploaded_and_says_so(tmp_path: Path) -> None:
    write = script(
        "import os",
        "path = os.path.join(os.environ['RIGSHIFT_OUTPUT_DIR'], 'big')",
        "open(path, 'wb').write(os.urandom(20000))",
    )

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=make_assignment("jobs/b", command=write, max_output_bytes=5000))
        await until(lambda: fake.finished("jobs/b"), what="the attempt to finish")

    fake = run_session(tmp_path, body)
    out = next(e.output for e in fake.applied[("jobs/b", 1)] if e.HasField("output"))
    assert out.over_limit and out.sha256 == ""
    assert out.size_bytes == 20000 and "over the limit of 5000 bytes" in out.message
    assert not fake.artifacts  # nothing, not the first 5000 bytes
    assert fake.finished("jobs/b").exit_code == 0
    assert "nothing was kept" in fake.output("jobs/b")


def test_no_output_limit_means_no_upload(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=make_assignment("jobs/n"))
        await until(lambda: fake.finished("jobs/n"), what="the attempt to finish")

    fake = run_session(tmp_path, body)
    assert "output" not in fake.kinds("jobs/n") and not fake.artifacts


def test_inputs_are_fetched_once_and_read_only_at_their_names(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "data.txt").write_text("rows")
    (src / "nested" / "more.txt").write_text("more")
    archive = pack_directory(src, max_bytes=1 << 20)
    sha = hashlib.sha256(archive).hexdigest()
    read = script(
        "import os",
        "d = os.path.join(os.environ['RIGSHIFT_INPUT_DIR'], 'data')",
        "more = open(os.path.join(d, 'nested', 'more.txt')).read()",
        "print(open(os.path.join(d, 'data.txt')).read(), more)",
    )

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.artifacts[sha] = archive
        for job, gpu in (("jobs/i1", 0), ("jobs/i2", 1)):
            fake.push(
                assignment=make_assignment(job, gpus=[gpu], command=read, inputs={"data": sha})
            )
        await until(lambda: fake.finished("jobs/i1") and fake.finished("jobs/i2"))

    fake = run_session(tmp_path, body)
    for job in ("jobs/i1", "jobs/i2"):
        assert fake.finished(job).exit_code == 0, fake.output(job)
        assert "rows more" in fake.output(job)
    assert fake.downloads == 1  # one fetch per rig, however many attempts name it
    assert not (tmp_path / "agent" / "artifacts" / f"{sha}.tar.gz").exists()  # extracted
    outputs = fake.output("jobs/i1") + fake.output("jobs/i2")
    assert "fetched in" in outputs and "cached on this rig" in outputs
    cached = tmp_path / "agent" / "inputs" / sha
    # Read-only for job users (a sandbox also binds it read-only; see test_agent_sandbox).
    assert (cached / "data.txt").stat().st_mode & 0o777 == 0o444
    assert (cached / "nested").stat().st_mode & 0o777 == 0o555
    assert not (tmp_path / "agent" / "input-views" / "i1-1").exists()  # cleaned up
