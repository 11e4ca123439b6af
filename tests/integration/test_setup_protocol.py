"""The setup phase over real gRPC and a real SQLite store: what an assignment carries,
PREPARING, setup time, the output report, the rig's environments in heartbeats, and all
of it across a broker restart."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from broker_harness import start_broker
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus

from broker.convert import timestamp
from rigshift.v1 import job_pb2
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg
from rigshift.v1 import worker_service_pb2 as ws

S, A = job_pb2.Job.State, job_pb2.Attempt.State
REQS = "Humanize==4.9.0\n# a comment\n"
NORMAL = "humanize==4.9.0\n"


def test_setup_phase_outputs_and_environments_survive_a_restart(tmp_path: Path) -> None:
    home = tmp_path / "b"
    rb = start_broker(home, lease_ttl_s=6.0, heartbeat_interval_s=1.0)
    farm = create_farm(rb.address)
    agent = ProtocolAgent(rb.address, farm.enrollment_token, gpus(1))
    agent.register()
    assert agent.heartbeat().status_wanted  # a new registration: the broker asks
    env_sha = hashlib.sha256(NORMAL.encode()).hexdigest()
    held = ws.HeartbeatRequest(worker=agent.worker, status=ws.WorkerStatus(environments=[env_sha]))
    assert not agent.stub.Heartbeat(held, metadata=agent.metadata).status_wanted
    assert not agent.heartbeat().status_wanted  # known now: no status needed
    agent.connect()
    spec = job_pb2.JobSpec(
        command=["python", "x.py"],
        gpu_count=1,
        environment=job_pb2.Environment(python_requirements=REQS),
    )
    with authed_channel(rb.address) as ch:
        jobs = jsg.JobServiceStub(ch)
        job = jobs.CreateJob(js.CreateJobRequest(spec=spec))
        assert job.spec.environment.python_requirements == NORMAL
        assert job.spec.environment.requirements_sha256 == env_sha
        a = agent.next_of("assignment")
        assert (a.spec.python_requirements, a.spec.requirements_sha256) == (NORMAL, env_sha)
        assert a.spec.max_output_bytes == 1 << 30  # the broker's default output limit
        agent.report(agent.event(a.job, a.attempt, preparing=ws.Preparing()))
        got = jobs.GetJob(js.GetJobRequest(name=job.name))
        assert (got.state, got.attempts[0].state) == (S.SCHEDULED, A.PREPARING)
        agent.report(
            agent.event(a.job, a.attempt, started=ws.Started(setup_milliseconds=4_200)),
            agent.event(
                a.job, a.attempt, output=ws.OutputUploaded(over_limit=True, size_bytes=5 << 30)
            ),
        )
        agent.finish(a.job, a.attempt)
        got = jobs.GetJob(js.GetJobRequest(name=job.name))
        assert got.state == S.SUCCEEDED and got.attempts[0].setup_milliseconds == 4_200
    agent.close()
    rb.stop()

    rb2 = start_broker(home, lease_ttl_s=6.0, heartbeat_interval_s=1.0)
    try:
        with authed_channel(rb2.address) as ch:
            jobs = jsg.JobServiceStub(ch)
            got = jobs.GetJob(js.GetJobRequest(name=job.name))
            assert got.attempts[0].setup_milliseconds == 4_200
            assert got.spec.environment.requirements_sha256 == env_sha
            outputs = jobs.ListJobOutputs(js.ListJobOutputsRequest(name=job.name)).outputs
            assert [(o.attempt, o.over_limit, o.size_bytes) for o in outputs] == [
                (1, True, 5 << 30)
            ]
        back = ProtocolAgent(rb2.address, farm.enrollment_token, gpus(1))
        back.worker, back.credential = agent.worker, agent.credential
        assert back.heartbeat().status_wanted  # the restarted broker asks again
    finally:
        rb2.stop()


def test_a_report_with_a_short_jobs_start_and_finish_charges_its_run(tmp_path: Path) -> None:
    """Started and finished in one ReportJobEvents call (a job that ended before the agent
    sent its start): GPU time is the rig's interval between them, not zero; a start the rig
    dates before the assignment counts from the assignment."""
    rb = start_broker(tmp_path / "b", lease_ttl_s=6.0, heartbeat_interval_s=1.0)
    farm = create_farm(rb.address)
    agent = ProtocolAgent(rb.address, farm.enrollment_token, gpus(1))
    agent.register()
    agent.connect()
    spec = job_pb2.JobSpec(command=["python", "x.py"], gpu_count=1)
    with authed_channel(rb.address) as ch:
        jobs = jsg.JobServiceStub(ch)
        for lead_s, bounded in ((0.4, False), (86_400.0, True)):
            job = jobs.CreateJob(js.CreateJobRequest(spec=spec))
            a = agent.next_of("assignment")
            time.sleep(0.6)  # the job ran 0.4 s of these before the rig reported it
            now = time.time()
            agent.report(
                agent.event(a.job, a.attempt, started=ws.Started(), time=timestamp(now - lead_s)),
                agent.event(a.job, a.attempt, finished=ws.Finished(), time=timestamp(now)),
            )
            got = jobs.GetJob(js.GetJobRequest(name=job.name))
            assert got.state == S.SUCCEEDED
            (attempt,) = got.attempts
            if bounded:  # from the assignment to the report: well under the day claimed
                assert attempt.start_time.ToNanoseconds() == attempt.schedule_time.ToNanoseconds()
                assert 0 < attempt.gpu_milliseconds < 60_000
            else:  # the rig's 0.4 s, whatever the report's lag
                assert attempt.gpu_milliseconds >= 400
                assert attempt.start_time.ToNanoseconds() >= attempt.schedule_time.ToNanoseconds()
    agent.close()
    rb.stop()
