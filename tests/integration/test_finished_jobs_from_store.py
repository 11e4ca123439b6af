"""Memory follows live work (docs/scale.md section 1), over real gRPC with real SQLite.

Alice's job ``done`` ran on rig-1 (a ProtocolAgent): it read an input, wrote a log line,
uploaded an output and succeeded; ``dropped`` was cancelled while it waited; ``waiting``
waits for a GPU model no rig has. Once stored, the two finished jobs leave the core; every
read of them (GetJob, ListJobs, CancelJob, WatchJob, StreamJobLogs, ListJobOutputs,
DownloadJobOutput, DownloadArtifact's ownership check, retention, CreateJob's request id)
is answered from the store, the same before and after a restart, and a restart loads only
the live job.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import grpc
import pytest
from broker_harness import RunningBroker, start_broker
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus

from client.errors import from_rpc_error
from rigshift.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)
from rigshift.v1 import worker_service_pb2 as ws

pytestmark = pytest.mark.timeout(60)

art = artifact_service_pb2
js = job_service_pb2
State = job_pb2.Job.State


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def upload(stub: artifact_service_pb2_grpc.ArtifactServiceStub, data: bytes, purpose: int) -> str:
    sha = hashlib.sha256(data).hexdigest()
    request = art.UploadArtifactRequest(
        sha256=sha, size_bytes=len(data), purpose=purpose, data=data
    )
    stub.UploadArtifact(iter([request]))
    return sha


def stubs(rb: RunningBroker, key: str):
    ch = authed_channel(rb.address, key)
    return (
        job_service_pb2_grpc.JobServiceStub(ch),
        artifact_service_pb2_grpc.ArtifactServiceStub(ch),
    )


def held(rb: RunningBroker) -> set[str]:
    """The job ids the broker's core holds."""
    assert rb.broker.service is not None
    return set(rb.broker.service.core.jobs)


class World:
    """See the module docstring."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.rb = rb = start_broker(home, artifact_retention_days=0)
        admin = admin_service_pb2_grpc.AdminServiceStub(authed_channel(rb.address))

        def key(principal: str) -> str:
            request = admin_service_pb2.CreateApiKeyRequest(
                role=admin_service_pb2.ApiKey.CLIENT, principal=principal
            )
            return admin.CreateApiKey(request).key

        self.alice, self.bob = key("alice"), key("bob")
        farm = create_farm(rb.address)
        agent = ProtocolAgent(rb.address, farm.enrollment_token, gpus(1))
        agent.register()
        agent.connect()
        jobs, artifacts = stubs(rb, self.alice)
        self.input_sha = upload(artifacts, tar_gz({"rows.csv": b"1,2\n"}), art.INPUT)
        spec = job_pb2.JobSpec(command=["train"], gpu_count=1, inputs={"rows": self.input_sha})
        self.done = jobs.CreateJob(js.CreateJobRequest(spec=spec, request_id="r-done")).name
        assignment = agent.next_of("assignment")
        assert assignment.job == self.done
        agent.start(self.done, 1)
        agent.report(agent.event(self.done, 1, log=ws.LogOutput(data="epoch 1\n")))
        self.output = tar_gz({"model.txt": b"weights " * 100})
        self.output_sha = hashlib.sha256(self.output).hexdigest()
        upload(stubs(rb, agent.credential)[1], self.output, art.OUTPUT)
        kept = ws.OutputUploaded(sha256=self.output_sha, size_bytes=len(self.output))
        agent.report(agent.event(self.done, 1, output=kept))
        agent.finish(self.done, 1, energy=7)
        agent.close()
        nowhere = job_pb2.JobSpec(command=["x"], gpu_count=1, gpu_model="none-such")
        self.dropped = jobs.CreateJob(js.CreateJobRequest(spec=nowhere, request_id="r-drop")).name
        jobs.CancelJob(js.CancelJobRequest(name=self.dropped))
        self.waiting = jobs.CreateJob(js.CreateJobRequest(spec=nowhere)).name

    def restart(self) -> None:
        self.rb.stop()
        self.rb = start_broker(self.home, artifact_retention_days=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("forget"))
    yield w
    w.rb.stop()


def ids(*names: str) -> set[str]:
    return {n.split("/")[1] for n in names}


def check_reads(w: World) -> None:
    """Every read of the finished jobs, which the core no longer holds."""
    assert held(w.rb) == ids(w.waiting)
    jobs, artifacts = stubs(w.rb, w.alice)
    bob_jobs, bob_artifacts = stubs(w.rb, w.bob)

    got = jobs.GetJob(js.GetJobRequest(name=w.done))
    assert (got.state, got.request_id, got.exit_code) == (State.SUCCEEDED, "r-done", 0)
    assert [h.to_state for h in got.history] == [
        State.PENDING,
        State.SCHEDULED,
        State.RUNNING,
        State.SUCCEEDED,
    ]
    assert [(a.number, a.energy_joules) for a in got.attempts] == [(1, 7)]
    assert got.cost_micros > 0
    assert jobs.GetJob(js.GetJobRequest(name=w.dropped)).state == State.CANCELLED
    with pytest.raises(grpc.RpcError) as exc:
        bob_jobs.GetJob(js.GetJobRequest(name=w.done))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as exc:
        jobs.GetJob(js.GetJobRequest(name="jobs/nosuchjob"))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND

    # ListJobs: newest first, paged by keyset, filtered by state and owner.
    listed = jobs.ListJobs(js.ListJobsRequest())
    assert [j.name for j in listed.jobs] == [w.waiting, w.dropped, w.done]
    assert listed.next_page_token == ""
    pages, token = [], ""
    while True:
        page = jobs.ListJobs(js.ListJobsRequest(page_size=1, page_token=token))
        pages += [j.name for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert pages == [w.waiting, w.dropped, w.done]
    finished = jobs.ListJobs(js.ListJobsRequest(states=[State.SUCCEEDED, State.CANCELLED]))
    assert [j.name for j in finished.jobs] == [w.dropped, w.done]
    assert finished.jobs[1].attempts[0].energy_joules == 7
    assert list(bob_jobs.ListJobs(js.ListJobsRequest()).jobs) == []

    # CancelJob: a succeeded job refuses, a cancelled one answers as it is.
    with pytest.raises(grpc.RpcError) as exc:
        jobs.CancelJob(js.CancelJobRequest(name=w.done))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert from_rpc_error(exc.value).reason == "JOB_FINISHED"
    assert jobs.CancelJob(js.CancelJobRequest(name=w.dropped)).state == State.CANCELLED

    # WatchJob: the final message, then the stream ends.
    watched = list(jobs.WatchJob(js.WatchJobRequest(name=w.done), timeout=10))
    assert [m.state for m in watched] == [State.SUCCEEDED]

    # StreamJobLogs (following): what the attempt wrote, then the stream ends.
    logs = jobs.StreamJobLogs(js.StreamJobLogsRequest(name=w.done, follow=True), timeout=10)
    assert [(c.attempt, c.data) for c in logs] == [(1, "epoch 1\n")]

    # Outputs.
    outputs = jobs.ListJobOutputs(js.ListJobOutputsRequest(name=w.done)).outputs
    assert [(o.attempt, o.sha256) for o in outputs] == [(1, w.output_sha)]
    data = b"".join(
        r.data for r in jobs.DownloadJobOutput(js.DownloadJobOutputRequest(name=w.done))
    )
    assert data == w.output

    # DownloadArtifact: alice's finished job names the input, bob's jobs do not.
    request = art.DownloadArtifactRequest(sha256=w.input_sha)
    assert b"".join(c.data for c in artifacts.DownloadArtifact(request))
    with pytest.raises(grpc.RpcError) as exc:
        next(bob_artifacts.DownloadArtifact(request))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # Retention: the recently finished job's input and output are still referenced.
    from broker.retention import referenced_artifacts

    svc = w.rb.broker.service
    assert svc is not None
    now = svc.clock()
    keep = referenced_artifacts(svc.core, now, 3600.0, svc.store.recent_artifacts)
    assert {w.input_sha, w.output_sha} <= keep
    assert referenced_artifacts(svc.core, now + 7200.0, 3600.0, svc.store.recent_artifacts) == set()

    # CreateJob with a finished job's request id: that job, no second one.
    spec = job_pb2.JobSpec(command=["other"], gpu_count=1)
    again = jobs.CreateJob(js.CreateJobRequest(spec=spec, request_id="r-done"))
    assert (again.name, again.state) == (w.done, State.SUCCEEDED)
    again = jobs.CreateJob(js.CreateJobRequest(spec=spec, request_id="r-drop"))
    assert (again.name, again.state) == (w.dropped, State.CANCELLED)
    assert len(jobs.ListJobs(js.ListJobsRequest()).jobs) == 3
    assert held(w.rb) == ids(w.waiting)


def test_finished_jobs_leave_memory_and_are_read_from_the_store(world: World) -> None:
    check_reads(world)


def test_after_a_restart_only_live_work_is_loaded_and_the_reads_are_the_same(
    world: World,
) -> None:
    world.restart()
    assert held(world.rb) == ids(world.waiting)
    check_reads(world)


def test_a_page_token_this_broker_did_not_issue_is_refused(world: World) -> None:
    jobs, _ = stubs(world.rb, world.alice)
    for token in ("o3", "k1.0_", "knan", "knan_abc", "kinf_abc", "kx_abc", "k1.0_ab-cd"):
        with pytest.raises(grpc.RpcError) as exc:
            jobs.ListJobs(js.ListJobsRequest(page_token=token))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, token


def test_a_cancelled_job_stays_until_its_agent_confirms_then_leaves(tmp_path: Path) -> None:
    rb = start_broker(tmp_path / "b", artifact_retention_days=0)
    try:
        farm = create_farm(rb.address)
        agent = ProtocolAgent(rb.address, farm.enrollment_token, gpus(1))
        agent.register()
        agent.connect()
        jobs = job_service_pb2_grpc.JobServiceStub(authed_channel(rb.address))
        spec = job_pb2.JobSpec(command=["train"], gpu_count=1)
        name = jobs.CreateJob(js.CreateJobRequest(spec=spec)).name
        assert agent.next_of("assignment").job == name
        agent.start(name, 1)
        assert jobs.CancelJob(js.CancelJobRequest(name=name)).state == State.CANCELLED
        assert agent.next_of("cancellation").job == name
        assert held(rb) == ids(name)  # its GPU stays held until the agent confirms
        agent.finish(name, 1, exit_code=-15)
        assert held(rb) == set()
        got = jobs.GetJob(js.GetJobRequest(name=name))
        assert (got.state, got.attempts[0].state) == (State.CANCELLED, job_pb2.Attempt.CANCELLED)
        # A late report of the forgotten attempt: told to stop, no error.
        response = agent.report(agent.event(name, 1, log=ws.LogOutput(data="late\n")))
        assert response is not None
        assert agent.next_of("cancellation").job == name
        agent.close()
    finally:
        rb.stop()
