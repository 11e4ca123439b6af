"""GPU health and verification over real gRPC: registration with the self-test's figures,
ReportGpuHealth, ReinstateGpu, and what survives a broker restart."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from broker_harness import start_broker
from click.testing import CliRunner, Result
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus

from broker.invariants import validate_state
from rigshift.v1 import admin_service_pb2, admin_service_pb2_grpc, farm_pb2, job_pb2
from rigshift.v1 import farm_service_pb2 as fs
from rigshift.v1 import farm_service_pb2_grpc as fsg
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg
from rigshift.v1 import worker_service_pb2 as ws
from rigshift_cli import main

State = job_pb2.Job.State
Gpu = farm_pb2.Gpu
XID79 = "XID 79: GPU has fallen off the bus"
# An RTX 3090's reference figures (rigshift.scoring), and a card a third as fast.
HONEST = farm_pb2.GpuMeasurement(
    fp16_gflops=49_700, fp32_gflops=24_920, usable_vram_mb=24_000, h2d_mbps=800, method="simulated"
)
IMPOSTOR = farm_pb2.GpuMeasurement(
    fp16_gflops=16_566, fp32_gflops=8_306, usable_vram_mb=24_000, method="simulated"
)


def measured(n: int, figures: farm_pb2.GpuMeasurement = HONEST) -> list[ws.GpuInfo]:
    out = gpus(n)
    for g in out:
        g.measurement.CopyFrom(figures)
        g.pcie_generation = 3
    return out


class Agent(ProtocolAgent):
    """The protocol agent with a host and GPU health reports."""

    def register(self, worker: str = "") -> ws.RegisterWorkerResponse:
        resp = self.stub.RegisterWorker(
            ws.RegisterWorkerRequest(
                enrollment_token=self.token,
                hostname=self.hostname,
                agent_version="test",
                gpus=self.gpu_infos,
                worker=worker,
                host=farm_pb2.HostInfo(ram_mb=65536, cpu_cores=8, disk_write_mbps=900),
            )
        )
        self.worker, self.credential = resp.worker, resp.credential
        return resp

    def health(self, *gpus: ws.GpuHealth) -> ws.ReportGpuHealthResponse:
        return self.stub.ReportGpuHealth(
            ws.ReportGpuHealthRequest(worker=self.worker, gpus=list(gpus)), metadata=self.metadata
        )


def out(index: int, reinstate_required: bool = False) -> ws.GpuHealth:
    return ws.GpuHealth(
        index=index, quarantined=True, reason=XID79, strikes=3 if reinstate_required else 1,
        reinstate_required=reinstate_required,
    )  # fmt: skip


def status_of(err: grpc.RpcError):
    """(code, ErrorInfo reason, BadRequest fields) of a rich error."""
    status = rpc_status.from_call(err)
    reason, fields = "", set()
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            fields = {v.field for v in br.field_violations}
    return err.code(), reason, fields


@pytest.fixture
def broker(tmp_path: Path):
    rb = start_broker(tmp_path / "b", lease_ttl_s=60.0, heartbeat_interval_s=1.0)
    yield rb
    rb.stop()


def workers(address: str, key: str | None = None) -> list[farm_pb2.Worker]:
    with authed_channel(address, key) as ch:
        return list(fsg.FarmServiceStub(ch).ListWorkers(fs.ListWorkersRequest()).workers)


def test_registration_shows_verification_score_and_host(broker):
    farm = create_farm(broker.address)
    honest = Agent(broker.address, farm.enrollment_token, measured(1), "honest")
    honest.register()
    liar = Agent(broker.address, farm.enrollment_token, measured(1, IMPOSTOR), "liar")
    liar.register()
    unmeasured = Agent(broker.address, farm.enrollment_token, gpus(1, selftest=False), "plain")
    unmeasured.register()
    by_host = {w.hostname: w for w in workers(broker.address)}
    (g,) = by_host["honest"].gpus
    assert (g.verification, g.score, g.verification_reason) == (Gpu.VERIFIED, 100, "")
    assert (g.pcie_generation, g.measurement.h2d_mbps) == (3, 800)
    assert by_host["honest"].host == farm_pb2.HostInfo(
        ram_mb=65536, cpu_cores=8, disk_write_mbps=900
    )
    (g,) = by_host["liar"].gpus
    assert (g.verification, g.score) == (Gpu.UNVERIFIED, 33)
    assert "measures short of its claimed model" in g.verification_reason
    (g,) = by_host["plain"].gpus
    assert (g.verification, g.score, g.HasField("measurement")) == (Gpu.PENDING, 0, False)
    for a in (honest, liar, unmeasured):
        a.close()


def test_a_quarantined_gpu_loses_its_attempt_and_the_neighbour_runs_on(tmp_path: Path):
    home = tmp_path / "b"
    rb = start_broker(home, lease_ttl_s=60.0, heartbeat_interval_s=1.0)
    farm = create_farm(rb.address)
    agent = Agent(rb.address, farm.enrollment_token, measured(2))
    agent.register()
    agent.connect()
    agent.next_of("reconcile")
    with authed_channel(rb.address) as ch:
        jobs = jsg.JobServiceStub(ch)
        names = []
        for _ in range(2):
            spec = job_pb2.JobSpec(command=["train"], gpu_count=1)
            names.append(jobs.CreateJob(js.CreateJobRequest(spec=spec)).name)
        on_gpu = {}
        for _ in range(2):
            a = agent.next_of("assignment")
            agent.start(a.job, a.attempt)
            on_gpu[a.gpu_indices[0]] = a.job
        agent.health(out(0))
        agent.health(out(0))  # retried: taken once
        cancel = agent.next_of("cancellation")
        assert (cancel.job, cancel.attempt) == (on_gpu[0], 1)
        assert "GPU 0" in cancel.reason and XID79 in cancel.reason
        lost = jobs.GetJob(js.GetJobRequest(name=on_gpu[0]))
        assert lost.attempts[0].state == job_pb2.Attempt.LOST
        assert any(h.to_state == State.PENDING and "quarantined" in h.reason for h in lost.history)
        assert [e.kind for e in lost.sla_events][:1] == [job_pb2.SlaEvent.INTERRUPTION]
        neighbour = jobs.GetJob(js.GetJobRequest(name=on_gpu[1]))
        assert (neighbour.state, len(neighbour.attempts)) == (State.RUNNING, 1)
    (w,) = workers(rb.address)
    g0 = w.gpus[0]
    assert (g0.state, g0.quarantine_reason, g0.HasField("quarantine_time")) == (
        Gpu.QUARANTINED,
        XID79,
        True,
    )
    assert w.gpus[1].state == Gpu.LEASED
    agent.close()
    rb.stop()
    validate_state(rb.broker.service.core)  # the ledger balances, no GPU held twice

    rb2 = start_broker(home, lease_ttl_s=60.0, heartbeat_interval_s=1.0)
    try:
        (w,) = workers(rb2.address)
        g0 = w.gpus[0]
        assert (g0.state, g0.quarantine_reason, g0.verification) == (
            Gpu.QUARANTINED,
            XID79,
            Gpu.VERIFIED,
        )
        assert (w.host.ram_mb, w.gpus[1].pcie_generation, w.gpus[1].score) == (65536, 3, 100)
    finally:
        rb2.stop()


def test_report_gpu_health_errors(broker):
    farm = create_farm(broker.address)
    agent = Agent(broker.address, farm.enrollment_token, measured(1))
    agent.register()
    with pytest.raises(grpc.RpcError) as err:
        agent.health(out(4))
    assert status_of(err.value) == (grpc.StatusCode.NOT_FOUND, "GPU_NOT_FOUND", {"gpus.index"})
    with pytest.raises(grpc.RpcError) as err:
        agent.health(out(0), out(0))
    assert status_of(err.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    agent.close()


def test_reinstate_gpu_reaches_the_agent_and_checks_its_preconditions(broker):
    farm = create_farm(broker.address)
    other = create_farm(broker.address, "farm-b")
    agent = Agent(broker.address, farm.enrollment_token, measured(2))
    agent.register()
    agent.connect()
    agent.next_of("reconcile")
    with authed_channel(broker.address) as ch:
        keys = admin_service_pb2_grpc.AdminServiceStub(ch)
        op = admin_service_pb2.ApiKey.OPERATOR
        mine = keys.CreateApiKey(
            admin_service_pb2.CreateApiKeyRequest(role=op, principal="op", farm=farm.name)
        ).key
        theirs = keys.CreateApiKey(
            admin_service_pb2.CreateApiKeyRequest(role=op, principal="op2", farm=other.name)
        ).key

    def reinstate(index: int, key: str = mine) -> farm_pb2.Worker:
        with authed_channel(broker.address, key) as ch:
            request = fs.ReinstateGpuRequest(worker=agent.worker, gpu_index=index)
            return fsg.FarmServiceStub(ch).ReinstateGpu(request)

    def refused(index: int, key: str = mine):
        with pytest.raises(grpc.RpcError) as err:
            reinstate(index, key)
        return status_of(err.value)

    agent.health(out(0, reinstate_required=True), out(1))
    assert refused(0, theirs)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "NOT_YOUR_FARM")
    assert refused(7) == (grpc.StatusCode.NOT_FOUND, "GPU_NOT_FOUND", {"gpu_index"})
    # GPU 1 is on probation: the agent re-tests it on its own
    assert refused(1)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "GPU_NOT_HELD_OUT")
    w = reinstate(0)
    assert (w.gpus[0].state, w.gpus[0].reinstate_required) == (Gpu.QUARANTINED, True)
    instruction = agent.next_of("reinstate")
    assert (instruction.gpu_index, instruction.requested_by) == (0, "op")
    agent.close()
    # an agent without an instruction stream: the instruction could not reach it
    quiet = Agent(broker.address, farm.enrollment_token, measured(1), "quiet")
    quiet.register()
    quiet.health(out(0, reinstate_required=True))
    with authed_channel(broker.address, mine) as ch, pytest.raises(grpc.RpcError) as err:
        request = fs.ReinstateGpuRequest(worker=quiet.worker, gpu_index=0)
        fsg.FarmServiceStub(ch).ReinstateGpu(request)
    code, reason, _ = status_of(err.value)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "WORKER_NOT_CONNECTED")
    quiet.close()


def test_cli_farm_workers_shows_each_gpu_and_reinstates_one(broker):
    farm = create_farm(broker.address)
    gpu_infos = measured(2)
    gpu_infos[1].measurement.CopyFrom(IMPOSTOR)
    agent = Agent(broker.address, farm.enrollment_token, gpu_infos)
    agent.register()
    agent.connect()
    agent.next_of("reconcile")
    agent.health(out(0, reinstate_required=True))

    def rs(*args: str) -> Result:
        return CliRunner().invoke(main, ["farm", "--broker", broker.address, *args])

    shown = rs("workers")
    assert shown.exit_code == 0, shown.output
    rows = {line.split()[1]: line for line in shown.stdout.splitlines() if "RTX 3090" in line}
    assert "SCORE" in shown.stdout and "VERIFICATION" in shown.stdout
    assert f"QUARANTINED ({XID79}; reinstate required" in rows["0"]
    assert " 100 " in rows["0"] and "VERIFIED" in rows["0"]
    assert "UNVERIFIED: measures short of its claimed model" in rows["1"]
    assert " 33 " in rows["1"] and "gen3 x16" in rows["1"]
    listed = json.loads(rs("workers", "--json").stdout)["workers"][0]["gpus"]
    assert [(g["state"], g["verification"], g["score"]) for g in listed] == [
        ("QUARANTINED", "VERIFIED", 100),
        ("IDLE", "UNVERIFIED", 33),
    ]

    done = rs("gpu", "reinstate", agent.worker.split("/")[1], "0")
    assert done.exit_code == 0, done.output
    assert "reinstate sent" in done.stdout
    assert agent.next_of("reinstate").gpu_index == 0
    refused = rs("gpu", "reinstate", agent.worker, "1")
    assert refused.exit_code == 1
    assert "not held out" in refused.stderr
    agent.close()
