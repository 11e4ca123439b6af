"""A full state directory on the rig, against the scripted broker of ``scripted_broker``
(a real gRPC port) and real 2 MiB tmpfs mounts under the agent's state directory: the
attempt fails as the rig's fault with ENOSPC named, the rig becomes unhealthy (its
``on_unhealthy`` hook is called once) and refuses what comes next as the rig's fault."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
from disk_helpers import tmpfs
from scripted_broker import FakeBroker, run_session, script, until

from harness.agent_fixtures import make_assignment
from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.agent import Agent

pytestmark = pytest.mark.timeout(60)

#: Incompressible, and more than the 2 MiB tmpfs holds.
BIG = os.urandom(3 << 20)


def archive(files: dict[str, bytes]) -> tuple[str, bytes]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def watch_unhealthy(agent: Agent, calls: list[str]) -> None:
    """Record each reason the runner gives the agent's ``on_unhealthy`` hook (which
    still runs: the agent refuses new work and has the broker drain the worker)."""
    assert agent.runner is not None and agent.runner.on_unhealthy is not None
    hook = agent.runner.on_unhealthy

    def record(reason: str) -> None:
        calls.append(reason)
        hook(reason)

    agent.runner.on_unhealthy = record


@pytest.mark.parametrize("where", ["attempts", "inputs", "checkpoints"])
def test_a_full_disk_during_setup_fails_the_attempt_as_the_rigs_fault(
    tmp_path: Path, where: str
) -> None:
    sha, data = archive({"big.bin": BIG})
    calls: list[str] = []

    async def body(fake: FakeBroker, agent: Agent) -> None:
        calls[:] = []
        watch_unhealthy(agent, calls)
        fake.artifacts[sha] = data
        a = make_assignment("jobs/full", command=script("print('ran')"))
        if where == "attempts":
            a.spec.working_dir_sha256 = sha
        elif where == "inputs":
            a.spec.inputs["data"] = sha
        else:
            a.checkpoint_sha256 = sha
        fake.push(assignment=a)
        await until(lambda: fake.finished("jobs/full"), what="the attempt to end")
        # What comes next is refused at once, as the rig's fault too.
        fake.push(assignment=make_assignment("jobs/next", gpus=[1], command=script("print(1)")))
        await until(lambda: fake.finished("jobs/next"), what="the refusal")
        assert agent.runner is not None and "ENOSPC" in agent.runner.unhealthy

    with tmpfs(tmp_path / "agent" / where, "2m") as mounted:
        fake = run_session(tmp_path, body)
        left = [p.name for p in mounted.rglob("*") if p.is_file()]
    first = fake.finished("jobs/full")
    assert first is not None and first.exit_code == 127
    assert first.cause == ws.Finished.SETUP_RIG  # the broker requeues it elsewhere
    assert first.message.startswith("the rig's disk is full: ENOSPC, No space left on device")
    assert "started" not in fake.kinds("jobs/full") and "ran" not in fake.output("jobs/full")
    assert calls == [first.message]  # once, with the reason
    refused = fake.finished("jobs/next")
    assert refused is not None and refused.cause == ws.Finished.SETUP_RIG
    assert refused.message == f"rig unhealthy, takes no work: {first.message}"
    assert fake.kinds("jobs/next") == ["preparing", "log", "finished"]
    assert left == []  # nothing half-written stays behind (a half checkpoint least of all)


def test_a_job_that_fails_on_a_full_output_dir_says_so_and_the_rig_turns_unhealthy(
    tmp_path: Path,
) -> None:
    write = script(
        "import os",
        "path = os.path.join(os.environ['RIGSHIFT_OUTPUT_DIR'], 'model.bin')",
        "open(path, 'wb').write(os.urandom(3 << 20))",  # OSError: exits with status 1
    )
    calls: list[str] = []

    async def body(fake: FakeBroker, agent: Agent) -> None:
        watch_unhealthy(agent, calls)
        a = make_assignment("jobs/out", command=write, max_output_bytes=8 << 20)
        fake.push(assignment=a)
        await until(lambda: fake.finished("jobs/out"), what="the attempt to end")

    with tmpfs(tmp_path / "agent" / "outputs", "2m"):
        fake = run_session(tmp_path, body)
    done = fake.finished("jobs/out")
    assert done is not None and done.exit_code == 1
    assert "the rig's disk is full: ENOSPC" in done.message
    assert "when the job ended with status 1" in done.message
    assert "No space left on device" in fake.output("jobs/out")  # the job's own traceback
    assert len(calls) == 1 and "ENOSPC" in calls[0]
