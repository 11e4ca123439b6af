"""The broker over real gRPC (127.0.0.1, port 0) with real SQLite and a protocol-speaking agent."""

from __future__ import annotations

import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus

from rigshift.v1 import farm_pb2, farm_service_pb2, farm_service_pb2_grpc, job_pb2
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg
from rigshift.v1 import worker_service_pb2 as ws

State = job_pb2.Job.State


@pytest.fixture
def jobs(broker_address):
    with authed_channel(broker_address) as ch:
        yield jsg.JobServiceStub(ch)


@pytest.fixture
def farms(broker_address):
    with authed_channel(broker_address) as ch:
        yield farm_service_pb2_grpc.FarmServiceStub(ch)


@pytest.fixture
def agent(broker_address):
    farm = create_farm(broker_address)
    a = ProtocolAgent(broker_address, farm.enrollment_token, gpus(4))
    a.register()
    a.connect()
    reconcile = a.next_of("reconcile")
    assert list(reconcile.assignments) == []
    yield a
    a.close()


def submit(jobs, gpu_count=1, **spec):
    spec.setdefault("command", ["python", "train.py"])
    return jobs.CreateJob(js.CreateJobRequest(spec=job_pb2.JobSpec(gpu_count=gpu_count, **spec)))


def wait_state(jobs, name, state, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        job = jobs.GetJob(js.GetJobRequest(name=name))
        if job.state == state or time.monotonic() > deadline:
            return job
        time.sleep(0.02)


def status_of(err: grpc.RpcError):
    """(code, ErrorInfo reason, {field: description}) of a rich error."""
    status = rpc_status.from_call(err)
    reason, fields = "", {}
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            fields = {v.field: v.description for v in br.field_violations}
    return err.code(), reason, fields


def test_ten_jobs_run_through_the_whole_lifecycle(jobs, agent):
    names = [submit(jobs).name for _ in range(10)]
    seen_gpus: set[int] = set()
    running: dict[str, int] = {}
    done = 0
    while done < 10:
        a = agent.next_of("assignment")
        assert len(a.gpu_indices) == 1
        gpu = a.gpu_indices[0]
        assert gpu not in running.values(), "a GPU was assigned twice at once"
        seen_gpus.add(gpu)
        assert wait_state(jobs, a.job, State.SCHEDULED).state == State.SCHEDULED
        agent.start(a.job, a.attempt)
        assert wait_state(jobs, a.job, State.RUNNING).state == State.RUNNING
        running[a.job] = gpu
        if len(running) == 4 or done + len(running) == 10:
            for job_name in list(running):
                agent.finish(job_name, 1, exit_code=0, energy=1000)
                del running[job_name]
                done += 1
    assert seen_gpus == {0, 1, 2, 3}
    for name in names:
        job = wait_state(jobs, name, State.SUCCEEDED)
        assert job.state == State.SUCCEEDED
        assert [State.Name(h.to_state) for h in job.history] == [
            "PENDING",
            "SCHEDULED",
            "RUNNING",
            "SUCCEEDED",
        ]
        assert job.attempts[0].energy_joules == 1000
        assert job.attempts[0].state == job_pb2.Attempt.SUCCEEDED
        assert job.attempts[0].price_micros_per_gpu_hour == 300_000


def test_unknown_gpu_model_stays_pending_with_reason(jobs, agent, running_broker):
    job = submit(jobs, gpu_model="A100")
    running_broker.scheduled()
    job = jobs.GetJob(js.GetJobRequest(name=job.name))
    assert job.state == State.PENDING
    assert job.pending_reasons[0].resource == "gpu_model"
    assert "A100" in job.pending_reasons[0].message
    assert not job.pending_reasons[0].resolvable


def test_too_many_gpus_says_best_available(jobs, agent, running_broker):
    first = submit(jobs, gpu_count=2)
    agent.next_of("assignment")
    second = submit(jobs, gpu_count=4)
    running_broker.scheduled()
    job = jobs.GetJob(js.GetJobRequest(name=second.name))
    assert job.state == State.PENDING
    reason = job.pending_reasons[0]
    assert (reason.resource, reason.available, reason.resolvable) == ("gpu_count", "2", True)
    assert "best has 2" in reason.message
    assert first.name != second.name


def test_create_job_is_idempotent_on_request_id(jobs):
    spec = job_pb2.JobSpec(command=["true"], gpu_count=1)
    a = jobs.CreateJob(js.CreateJobRequest(spec=spec, request_id="retry-me"))
    b = jobs.CreateJob(js.CreateJobRequest(spec=spec, request_id="retry-me"))
    assert a.name == b.name
    assert len(jobs.ListJobs(js.ListJobsRequest()).jobs) == 1


def test_bad_job_specs_get_field_violations_and_change_nothing(jobs):
    cases = [
        (job_pb2.JobSpec(command=["x"], gpu_count=0), "spec.gpu_count"),
        (job_pb2.JobSpec(command=[], gpu_count=1), "spec.command"),
        (job_pb2.JobSpec(command=["x"], gpu_count=1, min_vram_mb=-1), "spec.min_vram_mb"),
        (
            job_pb2.JobSpec(command=["x"], gpu_count=1, max_price_micros_per_gpu_hour=-5),
            "spec.max_price_micros_per_gpu_hour",
        ),
        (job_pb2.JobSpec(command=["x"], gpu_count=1, env={"1BAD": "v"}), "spec.env['1BAD']"),
        (
            job_pb2.JobSpec(command=["x"], gpu_count=1, working_dir_sha256="zz"),
            "spec.working_dir_sha256",
        ),
        (job_pb2.JobSpec(command=["x"], gpu_count=1, max_attempts=99), "spec.max_attempts"),
    ]
    for spec, field in cases:
        with pytest.raises(grpc.RpcError) as exc:
            jobs.CreateJob(js.CreateJobRequest(spec=spec))
        code, reason, fields = status_of(exc.value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, field
        assert reason == "INVALID_ARGUMENT"
        assert field in fields, (field, fields)
    with pytest.raises(grpc.RpcError) as exc:
        jobs.CreateJob(js.CreateJobRequest())
    assert status_of(exc.value)[2] == {"spec": "is required"}
    assert list(jobs.ListJobs(js.ListJobsRequest()).jobs) == []


def test_job_rpc_error_paths(jobs):
    for call, request in [
        (jobs.GetJob, js.GetJobRequest(name="jobs/nope")),
        (jobs.CancelJob, js.CancelJobRequest(name="jobs/nope")),
    ]:
        with pytest.raises(grpc.RpcError) as exc:
            call(request)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc:
        jobs.GetJob(js.GetJobRequest(name="jobs/../../etc"))
    assert status_of(exc.value)[2].keys() == {"name"}
    with pytest.raises(grpc.RpcError) as exc:
        list(jobs.WatchJob(js.WatchJobRequest(name="jobs/nope")))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc:
        list(jobs.StreamJobLogs(js.StreamJobLogsRequest(name="")))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for request, field in [
        (js.ListJobsRequest(page_size=5000), "page_size"),
        (js.ListJobsRequest(page_token="garbage"), "page_token"),
        (js.ListJobsRequest(states=[0]), "states[0]"),
    ]:
        with pytest.raises(grpc.RpcError) as exc:
            jobs.ListJobs(request)
        assert field in status_of(exc.value)[2]


def test_cancel_finished_job_is_failed_precondition(jobs, agent):
    job = submit(jobs)
    a = agent.next_of("assignment")
    agent.start(a.job, a.attempt)
    agent.finish(a.job, a.attempt)
    wait_state(jobs, job.name, State.SUCCEEDED)
    with pytest.raises(grpc.RpcError) as exc:
        jobs.CancelJob(js.CancelJobRequest(name=job.name))
    code, reason, _ = status_of(exc.value)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "JOB_FINISHED")


def test_cancel_running_job_pushes_cancellation_and_frees_gpu_on_ack(jobs, agent, running_broker):
    job = submit(jobs, gpu_count=4)
    a = agent.next_of("assignment")
    agent.start(a.job, a.attempt)
    cancelled = jobs.CancelJob(js.CancelJobRequest(name=job.name))
    assert cancelled.state == State.CANCELLED
    c = agent.next_of("cancellation")
    assert (c.job, c.attempt) == (job.name, 1)
    # GPUs stay held until the agent confirms: a new 4-GPU job must wait.
    waiting = submit(jobs, gpu_count=4)
    running_broker.scheduled()
    assert jobs.GetJob(js.GetJobRequest(name=waiting.name)).state == State.PENDING
    agent.finish(job.name, 1, exit_code=-15)
    assert agent.next_of("assignment").job == waiting.name
    final = jobs.GetJob(js.GetJobRequest(name=job.name))
    assert final.attempts[0].state == job_pb2.Attempt.CANCELLED
    # Cancelling twice is a no-op.
    assert jobs.CancelJob(js.CancelJobRequest(name=job.name)).state == State.CANCELLED


def test_duplicate_reports_are_applied_once(jobs, agent):
    job = submit(jobs)
    a = agent.next_of("assignment")
    started = agent.event(a.job, 1, started=ws.Started())
    log1 = agent.event(a.job, 1, log=ws.LogOutput(data="epoch 1\n"))
    assert agent.report(started, log1).applied == 2
    assert agent.report(started, log1).applied == 0  # the retry
    agent.finish(a.job, 1)
    chunks = list(jobs.StreamJobLogs(js.StreamJobLogsRequest(name=job.name)))
    assert "".join(c.data for c in chunks) == "epoch 1\n"


def test_watch_and_follow_logs_stream_until_the_job_ends(jobs, agent):
    job = submit(jobs)
    watch = jobs.WatchJob(js.WatchJobRequest(name=job.name))
    logs = jobs.StreamJobLogs(js.StreamJobLogsRequest(name=job.name, follow=True))
    a = agent.next_of("assignment")
    agent.start(a.job, 1)
    agent.report(agent.event(a.job, 1, log=ws.LogOutput(data="hello ")))
    agent.report(agent.event(a.job, 1, log=ws.LogOutput(data="world\n")))
    agent.finish(a.job, 1)
    assert "".join(c.data for c in logs) == "hello world\n"
    states = [u.state for u in watch]
    assert states[-1] == State.SUCCEEDED
    assert State.RUNNING in states


def test_stale_attempt_after_lease_expiry_is_told_to_stop(jobs, agent):
    job = submit(jobs)
    a = agent.next_of("assignment")
    agent.start(a.job, 1)
    # No heartbeats: the 3 s lease expires, the job goes back to PENDING.
    requeued = wait_state(jobs, job.name, State.PENDING, timeout=8)
    assert requeued.state == State.PENDING
    assert "lease expired" in requeued.history[-1].reason
    assert requeued.attempts[0].state == job_pb2.Attempt.LOST
    # The agent comes back: its old attempt is stale, and the job is placed again as attempt 2.
    agent.heartbeat()
    resp = agent.report(agent.event(a.job, 1, log=ws.LogOutput(data="late")))
    assert [(s.job, s.attempt) for s in resp.stale] == [(job.name, 1)]
    again = agent.next_of("assignment")
    assert (again.job, again.attempt) == (job.name, 2)


def test_worker_rpcs_need_the_right_credential(broker_address, agent):
    other = ProtocolAgent(broker_address, agent.token, gpus(1), hostname="rig-2")
    other.register()
    stub = agent.stub
    with pytest.raises(grpc.RpcError) as exc:
        stub.Heartbeat(ws.HeartbeatRequest(worker=agent.worker))
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as exc:
        stub.Heartbeat(ws.HeartbeatRequest(worker=agent.worker), metadata=other.metadata)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as exc:
        stub.RegisterWorker(
            ws.RegisterWorkerRequest(enrollment_token="wrong", hostname="h", gpus=gpus(1))
        )
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as exc:
        stub.RegisterWorker(ws.RegisterWorkerRequest(enrollment_token="x", hostname="h"))
    assert "gpus" in status_of(exc.value)[2]
    with pytest.raises(grpc.RpcError) as exc:
        agent.report(ws.JobEvent(job="jobs/x", attempt=0, sequence=0))
    assert set(status_of(exc.value)[2]) == {
        "events[0].attempt",
        "events[0].sequence",
        "events[0].kind",
    }
    # A report about an attempt that is not this worker's gets a stop order, nothing else.
    resp = agent.report(ws.JobEvent(job="jobs/x", attempt=1, sequence=1, started=ws.Started()))
    assert [(s.job, s.attempt) for s in resp.stale] == [("jobs/x", 1)]
    other.close()


def test_farm_rpcs_and_errors(farms, agent):
    workers = farms.ListWorkers(farm_service_pb2.ListWorkersRequest()).workers
    assert len(workers) == 1 and len(workers[0].gpus) == 4
    assert workers[0].state == farm_pb2.Worker.ONLINE
    drained = farms.DrainWorker(farm_service_pb2.DrainWorkerRequest(name=workers[0].name))
    assert drained.state == farm_pb2.Worker.DRAINING
    farm = farms.GetFarm(farm_service_pb2.GetFarmRequest(name=workers[0].farm))
    assert farm.display_name == "farm-a" and farm.enrollment_token == ""
    with pytest.raises(grpc.RpcError) as exc:
        farms.CreateFarm(
            farm_service_pb2.CreateFarmRequest(farm=farm_pb2.Farm(display_name="farm-a"))
        )
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as exc:
        farms.CreateFarm(
            farm_service_pb2.CreateFarmRequest(farm=farm_pb2.Farm(display_name="", pue_permille=9))
        )
    assert set(status_of(exc.value)[2]) == {"farm.display_name", "farm.pue_permille"}
    for call, request in [
        (farms.GetFarm, farm_service_pb2.GetFarmRequest(name="farms/nope")),
        (farms.DrainWorker, farm_service_pb2.DrainWorkerRequest(name="workers/nope")),
        (farms.ListWorkers, farm_service_pb2.ListWorkersRequest(parent="farms/nope")),
    ]:
        with pytest.raises(grpc.RpcError) as exc:
            call(request)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_drained_worker_gets_no_new_work(jobs, farms, agent, running_broker):
    farms.DrainWorker(farm_service_pb2.DrainWorkerRequest(name=agent.worker))
    job = submit(jobs)
    running_broker.scheduled()
    assert jobs.GetJob(js.GetJobRequest(name=job.name)).state == State.PENDING


def test_list_jobs_pages_and_filters(jobs):
    names = [submit(jobs).name for _ in range(5)]
    jobs.CancelJob(js.CancelJobRequest(name=names[0]))
    page1 = jobs.ListJobs(js.ListJobsRequest(page_size=3))
    page2 = jobs.ListJobs(js.ListJobsRequest(page_size=3, page_token=page1.next_page_token))
    assert page2.next_page_token == ""
    listed = [j.name for j in page1.jobs] + [j.name for j in page2.jobs]
    assert sorted(listed) == sorted(names)
    cancelled = jobs.ListJobs(js.ListJobsRequest(states=[State.CANCELLED]))
    assert [j.name for j in cancelled.jobs] == [names[0]]


def test_health_and_reflection_list_the_services(broker_address):
    with authed_channel(broker_address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "rigshift.v1.JobService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "rigshift.v1.JobService",
        "rigshift.v1.WorkerService",
        "rigshift.v1.FarmService",
    } <= names
