"""Full disks, for real: a 2 MiB tmpfs mounted (as root) as the broker's artifact store,
or under an agent's state directory.

- **Artifact store full.** A real broker (gRPC, SQLite on another disk) stores its
  artifacts on the tmpfs, filled to the brim. Uploads of every purpose (a working
  directory, an input, and a real agent's checkpoint and output) are refused with
  ``RESOURCE_EXHAUSTED`` / ``ARTIFACT_STORE_FULL`` and a readable message, up front or
  half-way through; nothing of them is ever visible or referenced; jobs, heartbeats and
  reads go on. Once space is freed the same uploads succeed.
- **Agent state dir full.** A real agent whose ``state_dir/attempts`` is the tmpfs takes
  a job whose working directory does not fit: the attempt fails as the rig's fault with
  ENOSPC named, the broker requeues the job, the rig turns unhealthy and is drained
  (``AttemptRunner.on_unhealthy``), and a second, healthy rig runs the job.

The figures (how long each step took) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from broker_harness import RunningBroker, start_broker
from disk_helpers import fill, free_bytes, tmpfs

from client.errors import ResourceExhausted
from client.sdk import Client
from rigshift.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    farm_pb2,
    job_pb2,
    worker_service_pb2,
    worker_service_pb2_grpc,
)
from worker_agent.agent import Agent
from worker_agent.config import AgentConfig
from worker_agent.executor import LocalExecutor
from worker_agent.gpu import SimulatedBackend

pytestmark = pytest.mark.timeout(120)

PY = sys.executable
KiB, MiB = 1 << 10, 1 << 20
TERMINAL = (job_pb2.Job.SUCCEEDED, job_pb2.Job.FAILED, job_pb2.Job.CANCELLED)


def agent_config(root: Path, address: str, token: str, hostname: str, **kw: object) -> AgentConfig:
    base: dict[str, object] = {
        "broker_address": address,
        "enrollment_token": token,
        "state_dir": root / hostname,
        "hostname": hostname,
        "heartbeat_interval_s": 0.5,
        "lease_ttl_s": 3.0,
        "report_flush_s": 0.05,
        "progress_interval_s": 1.0,
        "energy_sample_interval_s": 0.2,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
        "drain_grace_s": 2.0,
        "cancel_grace_s": 1.0,
        "sandbox": "none",
        **kw,
    }
    return AgentConfig(**base)  # type: ignore[arg-type]


def new_agent(config: AgentConfig) -> Agent:
    return Agent(
        config,
        backend=SimulatedBackend("RTX3090x1", seed=config.hostname),
        executor=LocalExecutor(flush_s=0.05, kill_grace_s=1.0),
    )


async def until(predicate: Callable[[], object], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.1)


def job_state(client: Client, name: str) -> job_pb2.Job:
    return client.get_job(name)


def stored(root: Path) -> list[str]:
    """The blobs and partial uploads in the store (not the test's filler)."""
    return sorted(p.name for p in root.rglob("*") if p.is_file() and "filler" not in p.name)


# --- the artifact store ----------------------------------------------------------------

#: Writes a 300 KiB checkpoint and a 300 KiB output, waits for the agent to try the
#: checkpoint, then succeeds.
JOB = r"""
import os, sys, time
data = os.urandom(300 * 1024)
ckpt = os.path.join(os.environ["RIGSHIFT_CHECKPOINT_DIR"], "state.bin")
open(ckpt + ".tmp", "wb").write(data)
os.replace(ckpt + ".tmp", ckpt)
open(os.path.join(os.environ["RIGSHIFT_OUTPUT_DIR"], "model.bin"), "wb").write(data)
time.sleep(float(sys.argv[1]))
print("trained", flush=True)
"""


def _upload_pausing_after_first_chunk(
    address: str, key: str, data: bytes, go_on: threading.Event
) -> grpc.RpcError | None:
    """A raw UploadArtifact stream that sends 256 KiB, waits for ``go_on``, then the rest;
    the error it ended with (None when it succeeded)."""
    sha = hashlib.sha256(data).hexdigest()

    def chunks():  # type: ignore[no-untyped-def]
        yield artifact_service_pb2.UploadArtifactRequest(
            sha256=sha, size_bytes=len(data), data=data[: 256 * KiB]
        )
        go_on.wait(30)
        yield artifact_service_pb2.UploadArtifactRequest(data=data[256 * KiB :])

    with grpc.insecure_channel(address) as channel:
        stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
        try:
            stub.UploadArtifact(chunks(), metadata=(("authorization", f"Bearer {key}"),))
        except grpc.RpcError as err:
            return err
    return None


def test_a_full_artifact_store_refuses_uploads_and_the_broker_serves_the_rest(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "artifacts", "2m") as store:
        rb = start_broker(
            tmp_path / "broker",
            artifact_dir=str(store),
            lease_ttl_s=3.0,
            heartbeat_interval_s=0.5,
        )
        try:
            asyncio.run(_store_full(tmp_path, rb, store))
        finally:
            rb.stop()


async def _store_full(tmp_path: Path, rb: RunningBroker, store: Path) -> None:
    client = Client(rb.address, api_key=rb.admin_key)
    token = (await asyncio.to_thread(client.create_farm, "disk")).enrollment_token
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "weights.bin").write_bytes(os.urandom(300 * KiB))
    (workdir / "job.py").write_text(JOB)
    inputs = tmp_path / "input"
    inputs.mkdir()
    (inputs / "data.bin").write_bytes(os.urandom(300 * KiB))
    config = agent_config(
        tmp_path / "agents",
        rb.address,
        token,
        "rig-a",
        checkpoint_scan_interval_s=0.2,
        checkpoint_min_interval_s=0.5,
    )
    async with new_agent(config) as agent:
        filler = fill(store / "filler", leave=100 * KiB)
        print(f"\nartifact store: {free_bytes(store)} bytes free")

        # Client uploads, each purpose: refused at once, with the reason.
        t0 = time.monotonic()
        with pytest.raises(ResourceExhausted) as exc:
            await asyncio.to_thread(client.upload_working_dir, workdir)
        took = time.monotonic() - t0
        assert exc.value.reason == "ARTIFACT_STORE_FULL"
        assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert exc.value.message.startswith("the broker's artifact store is full: ")
        print(f"working dir refused in {took * 1000:.0f} ms: {exc.value}")
        with pytest.raises(ResourceExhausted, match="artifact store is full") as exc:
            await asyncio.to_thread(
                client.create_job, ["true"], inputs={"data": inputs}, display_name="needs-input"
            )
        assert exc.value.reason == "ARTIFACT_STORE_FULL"
        jobs = await asyncio.to_thread(lambda: list(client.iter_jobs()))
        assert jobs == []  # the job that needed the input was never created

        # Half-way: the stream's first 256 KiB fit; then the disk fills.
        filler.unlink()
        go_on = threading.Event()
        data = os.urandom(900 * KiB)
        upload = asyncio.create_task(
            asyncio.to_thread(
                _upload_pausing_after_first_chunk, rb.address, rb.admin_key, data, go_on
            )
        )
        sha = hashlib.sha256(data).hexdigest()
        partial = store / ".partial" / sha
        await until(lambda: partial.exists() and partial.stat().st_size > 0, 30, "first chunk")
        filler = fill(store / "filler", leave=100 * KiB)
        go_on.set()
        err = await upload
        assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the broker's artifact store is full" in (err.details() or "")
        status = await asyncio.to_thread(
            client._artifacts.GetUploadStatus,
            artifact_service_pb2.GetUploadStatusRequest(sha256=sha),
            metadata=client._metadata,
        )
        assert (status.complete, status.received_bytes) == (False, 0)  # nothing to resume
        assert stored(store) == []  # neither a blob nor a partial: nothing visible
        filler = fill(store / "filler-2", leave=100 * KiB)  # what the partial held is free

        # The rest of the broker serves on: jobs without artifacts, heartbeats, reads.
        t0 = time.monotonic()
        job = await asyncio.to_thread(
            client.create_job, [PY, "-c", JOB, "2"], display_name="no-artifacts"
        )
        await until(lambda: job_state(client, job.name).state in TERMINAL, 60, "the job")
        done = await asyncio.to_thread(job_state, client, job.name)
        assert done.state == job_pb2.Job.SUCCEEDED, done.status_message
        print(f"job without artifacts succeeded in {time.monotonic() - t0:.1f} s meanwhile")
        assert done.checkpoint_sha256 == ""  # the agent's checkpoint upload was refused
        outputs = await asyncio.to_thread(client.list_outputs, job.name)
        assert len(outputs) == 1 and outputs[0].sha256 == ""
        assert "RESOURCE_EXHAUSTED" in outputs[0].message
        assert "the broker's artifact store is full" in outputs[0].message
        print(f"the agent's output: {outputs[0].message}")
        workers = await asyncio.to_thread(lambda: list(client.iter_workers()))
        assert [w.state for w in workers] == [farm_pb2.Worker.ONLINE]  # heartbeats go on
        worker_stub = worker_service_pb2_grpc.WorkerServiceStub(agent._channel)
        await worker_stub.Heartbeat(
            worker_service_pb2.HeartbeatRequest(worker=agent.worker),
            metadata=agent._metadata(),
            timeout=5,
        )
        assert stored(store) == []

        # Space is back: the same uploads go through, and jobs get their artifacts.
        for f in store.glob("filler*"):
            f.unlink()
        t0 = time.monotonic()
        sha_wd = await asyncio.to_thread(client.upload_working_dir, workdir)
        print(f"after freeing space: working dir stored in {time.monotonic() - t0:.2f} s")
        job = await asyncio.to_thread(
            client.create_job,
            [PY, "job.py", "2"],
            working_dir_sha256=sha_wd,
            inputs={"data": inputs},
            display_name="with-artifacts",
        )
        await until(lambda: job_state(client, job.name).state in TERMINAL, 60, "the job")
        done = await asyncio.to_thread(job_state, client, job.name)
        assert done.state == job_pb2.Job.SUCCEEDED, done.status_message
        assert done.checkpoint_sha256  # the agent's checkpoint was stored this time
        outputs = await asyncio.to_thread(client.list_outputs, job.name)
        assert outputs[0].sha256 and not outputs[0].message
        names = stored(store)
        assert sha_wd in names and done.checkpoint_sha256 in names
        assert outputs[0].sha256 in names
        assert list((store / ".partial").iterdir()) == []


# --- the agent's state directory -------------------------------------------------------


def test_a_full_state_dir_fails_the_attempt_as_the_rigs_fault_and_drains_the_rig(
    tmp_path: Path,
) -> None:
    agents = tmp_path / "agents"
    with tmpfs(agents / "rig-a" / "attempts", "2m"):
        rb = start_broker(tmp_path / "broker", lease_ttl_s=3.0, heartbeat_interval_s=0.5)
        try:
            asyncio.run(_state_dir_full(tmp_path, rb))
        finally:
            rb.stop()


def drain_when_unhealthy(agent: Agent, client: Client) -> list[str]:
    """What ``worker_agent/agent.py`` is to do with ``AttemptRunner.on_unhealthy``: drain
    the worker (``FarmService.DrainWorker``) so the broker places nothing more there.
    Installed only while agent.py does not wire the hook itself; the reasons it got."""
    reasons: list[str] = []
    runner = agent.runner
    assert runner is not None
    if runner.on_unhealthy is not None:
        inner = runner.on_unhealthy

        def record(reason: str) -> None:
            reasons.append(reason)
            inner(reason)

        runner.on_unhealthy = record
        return reasons
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Future[object]] = set()

    def drain(reason: str) -> None:
        reasons.append(reason)
        task = loop.run_in_executor(None, client.drain_worker, agent.worker)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    runner.on_unhealthy = drain
    return reasons


async def _state_dir_full(tmp_path: Path, rb: RunningBroker) -> None:
    client = Client(rb.address, api_key=rb.admin_key)
    token = (await asyncio.to_thread(client.create_farm, "disk")).enrollment_token
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "weights.bin").write_bytes(os.urandom(3 * MiB))  # more than the 2 MiB tmpfs
    (workdir / "job.py").write_text("import os; print('ran on', os.uname().nodename)\n")
    sha = await asyncio.to_thread(client.upload_working_dir, workdir)
    agents = tmp_path / "agents"
    async with new_agent(agent_config(agents, rb.address, token, "rig-a")) as a:
        reasons = drain_when_unhealthy(a, client)
        t0 = time.monotonic()
        job = await asyncio.to_thread(
            client.create_job, [PY, "job.py"], working_dir_sha256=sha, display_name="big"
        )

        def failed_once() -> bool:
            j = job_state(client, job.name)
            return bool(j.attempts) and j.attempts[0].state == job_pb2.Attempt.FAILED

        await until(failed_once, 60, "attempt 1 to fail")
        failed_after = time.monotonic() - t0
        j = await asyncio.to_thread(job_state, client, job.name)
        requeued = next(
            h.reason for h in j.history if h.to_state == job_pb2.Job.PENDING and "setup" in h.reason
        )
        assert "setup failed: the rig's disk is full: ENOSPC" in requeued
        assert "(the rig's fault); requeued after attempt 1" in requeued
        print(f"\nattempt 1 failed after {failed_after:.2f} s: {requeued}")

        def drained() -> bool:
            return any(w.state == farm_pb2.Worker.DRAINING for w in client.iter_workers())

        await until(drained, 30, "rig-a to be drained")
        print(f"rig-a drained {time.monotonic() - t0:.2f} s after the submission")
        assert len(reasons) == 1 and "ENOSPC" in reasons[0]
        assert a.runner is not None and a.runner.unhealthy == reasons[0]
        j = await asyncio.to_thread(job_state, client, job.name)
        assert j.state in (job_pb2.Job.PENDING, job_pb2.Job.SCHEDULED, job_pb2.Job.RUNNING)
        assert len(j.attempts) == 1  # nothing more was placed on the unhealthy rig

        async with new_agent(agent_config(agents, rb.address, token, "rig-b")):
            await until(lambda: job_state(client, job.name).state in TERMINAL, 60, "the job")
            print(f"succeeded on rig-b {time.monotonic() - t0:.2f} s after the submission")
        done = await asyncio.to_thread(job_state, client, job.name)
        assert done.state == job_pb2.Job.SUCCEEDED, done.status_message
        assert len(done.attempts) == 2 and done.attempts[0].worker != done.attempts[1].worker
        logs = "".join(
            c.data for c in await asyncio.to_thread(lambda: list(client.stream_logs(job.name)))
        )
        assert "ran on" in logs
