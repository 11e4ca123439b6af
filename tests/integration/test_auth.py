"""Authentication and the authorisation matrix, over real gRPC with real keys.

Callers: nobody, clients alice and bob, operators of farm 1 and farm 2, the admin,
and the workers of farm 1 and farm 2. Every cell below is asserted.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from broker_harness import start_broker
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from protocol_agent import ProtocolAgent, authed_channel, gpus

from rigshift.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    farm_pb2,
    farm_service_pb2,
    farm_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

OK = grpc.StatusCode.OK
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
HELD = grpc.StatusCode.FAILED_PRECONDITION  # allowed, but the state says no
MISSING = grpc.StatusCode.NOT_FOUND  # allowed, but there is no such thing


class World:
    """A broker with two farms, their operators and workers, two clients and a job of alice's."""

    def __init__(self, rb) -> None:
        self.rb = rb
        self.admin = rb.admin_key
        admin = self.stubs(self.admin)
        self.farm1 = admin["farm"].CreateFarm(
            farm_service_pb2.CreateFarmRequest(farm=farm_pb2.Farm(display_name="one"))
        )
        self.farm2 = admin["farm"].CreateFarm(
            farm_service_pb2.CreateFarmRequest(farm=farm_pb2.Farm(display_name="two"))
        )

        def key(role, principal, farm=""):
            request = admin_service_pb2.CreateApiKeyRequest(
                role=role, principal=principal, farm=farm
            )
            return admin["admin"].CreateApiKey(request).key

        self.alice = key(admin_service_pb2.ApiKey.CLIENT, "alice")
        self.bob = key(admin_service_pb2.ApiKey.CLIENT, "bob")
        self.op1 = key(admin_service_pb2.ApiKey.OPERATOR, "op1", self.farm1.name)
        self.op2 = key(admin_service_pb2.ApiKey.OPERATOR, "op2", self.farm2.name)
        self.w1 = ProtocolAgent(rb.address, self.farm1.enrollment_token, gpus(1), "rig-1")
        self.w1.register()
        self.w2 = ProtocolAgent(rb.address, self.farm2.enrollment_token, gpus(1), "rig-2")
        self.w2.register()
        self.job = self.stubs(self.alice)["job"].CreateJob(
            job_service_pb2.CreateJobRequest(
                spec=job_pb2.JobSpec(command=["x"], gpu_count=1, gpu_model="none-such")
            )
        )
        self.callers = {
            "nobody": None,
            "alice": self.alice,
            "bob": self.bob,
            "op1": self.op1,
            "op2": self.op2,
            "admin": self.admin,
            "w1": self.w1.credential,
            "w2": self.w2.credential,
        }

    def stubs(self, key):
        ch = authed_channel(self.rb.address, key) if key else grpc.insecure_channel(self.rb.address)
        return {
            "job": job_service_pb2_grpc.JobServiceStub(ch),
            "farm": farm_service_pb2_grpc.FarmServiceStub(ch),
            "worker": worker_service_pb2_grpc.WorkerServiceStub(ch),
            "artifact": artifact_service_pb2_grpc.ArtifactServiceStub(ch),
            "admin": admin_service_pb2_grpc.AdminServiceStub(ch),
        }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    rb = start_broker(tmp_path_factory.mktemp("auth"))
    w = World(rb)
    yield w
    w.w1.close()
    w.w2.close()
    rb.stop()


def code(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__next__"):
            next(result, None)  # an empty stream is a success too
        return OK
    except grpc.RpcError as err:
        return err.code()


def calls(w: World):
    """(label, function of stubs) for one representative call of every RPC."""
    job = w.job.name
    jr = job_service_pb2
    fr = farm_service_pb2
    spec = job_pb2.JobSpec(command=["y"], gpu_count=1, gpu_model="none-such")
    return {
        "CreateJob": lambda s: s["job"].CreateJob(jr.CreateJobRequest(spec=spec)),
        "GetJob(alice's)": lambda s: s["job"].GetJob(jr.GetJobRequest(name=job)),
        "ListJobs": lambda s: s["job"].ListJobs(jr.ListJobsRequest()),
        "WatchJob(alice's)": lambda s: s["job"].WatchJob(jr.WatchJobRequest(name=job)),
        "StreamJobLogs(alice's)": lambda s: s["job"].StreamJobLogs(
            jr.StreamJobLogsRequest(name=job)
        ),
        "QuoteJob": lambda s: s["job"].QuoteJob(jr.QuoteJobRequest(spec=spec)),
        "CreateFarm": lambda s: s["farm"].CreateFarm(
            fr.CreateFarmRequest(farm=farm_pb2.Farm(display_name=f"f{time.monotonic_ns()}"))
        ),
        "GetFarm(one)": lambda s: s["farm"].GetFarm(fr.GetFarmRequest(name=w.farm1.name)),
        "UpdateFarm(one).tariff": lambda s: s["farm"].UpdateFarm(
            fr.UpdateFarmRequest(
                farm=farm_pb2.Farm(name=w.farm1.name, tariff_micros_per_kwh=90_000),
                update_mask=field_mask_pb2.FieldMask(paths=["tariff_micros_per_kwh"]),
            )
        ),
        "UpdateFarm(one).fee": lambda s: s["farm"].UpdateFarm(
            fr.UpdateFarmRequest(
                farm=farm_pb2.Farm(name=w.farm1.name, broker_fee_permille=150),
                update_mask=field_mask_pb2.FieldMask(paths=["broker_fee_permille"]),
            )
        ),
        "ListWorkers(one)": lambda s: s["farm"].ListWorkers(
            fr.ListWorkersRequest(parent=w.farm1.name)
        ),
        "DrainWorker(rig-1)": lambda s: s["farm"].DrainWorker(
            fr.DrainWorkerRequest(name=w.w1.worker)
        ),
        "GetEarnings(one)": lambda s: s["farm"].GetEarnings(
            fr.GetEarningsRequest(parent=w.farm1.name)
        ),
        # GPU 0 is in service: whoever may ask is answered FAILED_PRECONDITION (not held out)
        "ReinstateGpu(rig-1)": lambda s: s["farm"].ReinstateGpu(
            fr.ReinstateGpuRequest(worker=w.w1.worker, gpu_index=0)
        ),
        # A window a day ahead: it changes nothing the other cells see.
        "CreateCurtailment(one)": lambda s: s["farm"].CreateCurtailment(
            fr.CreateCurtailmentRequest(
                farm=w.farm1.name,
                start_time=timestamp_pb2.Timestamp(seconds=int(time.time()) + 86400),
                duration_seconds=60,
            )
        ),
        "ListCurtailments(one)": lambda s: s["farm"].ListCurtailments(
            fr.ListCurtailmentsRequest(farm=w.farm1.name)
        ),
        "CancelCurtailment(one, unknown)": lambda s: s["farm"].CancelCurtailment(
            fr.CancelCurtailmentRequest(name=f"{w.farm1.name}/curtailments/none")
        ),
        "ReportGpuHealth(rig-1)": lambda s: s["worker"].ReportGpuHealth(
            worker_service_pb2.ReportGpuHealthRequest(worker=w.w1.worker)
        ),
        "Heartbeat(rig-1)": lambda s: s["worker"].Heartbeat(
            worker_service_pb2.HeartbeatRequest(worker=w.w1.worker)
        ),
        "UploadArtifact": lambda s: s["artifact"].UploadArtifact(
            iter(
                [
                    artifact_service_pb2.UploadArtifactRequest(
                        sha256="2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
                        size_bytes=5,
                        data=b"hello",
                    )
                ]
            )
        ),
        "ListApiKeys": lambda s: s["admin"].ListApiKeys(admin_service_pb2.ListApiKeysRequest()),
    }


#                          nobody  alice   bob     op1     op2     admin   w1      w2
MATRIX = {
    "CreateJob": (UNAUTH, OK, OK, DENIED, DENIED, OK, DENIED, DENIED),
    "GetJob(alice's)": (UNAUTH, OK, DENIED, DENIED, DENIED, OK, DENIED, DENIED),
    "ListJobs": (UNAUTH, OK, OK, DENIED, DENIED, OK, DENIED, DENIED),
    "WatchJob(alice's)": (UNAUTH, OK, DENIED, DENIED, DENIED, OK, DENIED, DENIED),
    "StreamJobLogs(alice's)": (UNAUTH, OK, DENIED, DENIED, DENIED, OK, DENIED, DENIED),
    "QuoteJob": (UNAUTH, OK, OK, DENIED, DENIED, OK, DENIED, DENIED),
    "CreateFarm": (UNAUTH, DENIED, DENIED, DENIED, DENIED, OK, DENIED, DENIED),
    "GetFarm(one)": (UNAUTH, DENIED, DENIED, OK, DENIED, OK, DENIED, DENIED),
    "UpdateFarm(one).tariff": (UNAUTH, DENIED, DENIED, OK, DENIED, OK, DENIED, DENIED),
    "UpdateFarm(one).fee": (UNAUTH, DENIED, DENIED, DENIED, DENIED, OK, DENIED, DENIED),
    "ListWorkers(one)": (UNAUTH, DENIED, DENIED, OK, DENIED, OK, DENIED, DENIED),
    "DrainWorker(rig-1)": (UNAUTH, DENIED, DENIED, OK, DENIED, OK, OK, DENIED),
    "GetEarnings(one)": (UNAUTH, DENIED, DENIED, OK, DENIED, OK, DENIED, DENIED),
    "ReinstateGpu(rig-1)": (UNAUTH, DENIED, DENIED, HELD, DENIED, HELD, DENIED, DENIED),
    "CreateCurtailment(one)": (UNAUTH, DENIED, DENIED, OK, DENIED, OK, DENIED, DENIED),
    "ListCurtailments(one)": (UNAUTH, DENIED, DENIED, OK, DENIED, OK, DENIED, DENIED),
    "CancelCurtailment(one, unknown)": (
        UNAUTH,
        DENIED,
        DENIED,
        MISSING,
        DENIED,
        MISSING,
        DENIED,
        DENIED,
    ),
    "ReportGpuHealth(rig-1)": (UNAUTH, DENIED, DENIED, DENIED, DENIED, DENIED, OK, DENIED),
    "Heartbeat(rig-1)": (UNAUTH, DENIED, DENIED, DENIED, DENIED, DENIED, OK, DENIED),
    "UploadArtifact": (UNAUTH, OK, OK, DENIED, DENIED, OK, OK, OK),
    "ListApiKeys": (UNAUTH, DENIED, DENIED, DENIED, DENIED, OK, DENIED, DENIED),
}
CALLERS = ("nobody", "alice", "bob", "op1", "op2", "admin", "w1", "w2")


@pytest.mark.parametrize("method", sorted(MATRIX))
def test_authorisation_matrix(world: World, method: str):
    call = calls(world)[method]
    got = {}
    for caller in CALLERS:
        got[caller] = code(lambda caller=caller: call(world.stubs(world.callers[caller])))
    want = dict(zip(CALLERS, MATRIX[method], strict=True))
    assert got == want


def test_listings_show_only_what_the_caller_owns(world: World):
    bob_jobs = world.stubs(world.bob)["job"].ListJobs(job_service_pb2.ListJobsRequest()).jobs
    assert world.job.name not in [j.name for j in bob_jobs]
    alice_jobs = world.stubs(world.alice)["job"].ListJobs(job_service_pb2.ListJobsRequest()).jobs
    assert world.job.name in [j.name for j in alice_jobs]
    assert {j.owner for j in alice_jobs} == {"alice"}
    op1_workers = world.stubs(world.op1)["farm"].ListWorkers(farm_service_pb2.ListWorkersRequest())
    assert {w.farm for w in op1_workers.workers} == {world.farm1.name}
    all_workers = world.stubs(world.admin)["farm"].ListWorkers(
        farm_service_pb2.ListWorkersRequest()
    )
    assert {w.farm for w in all_workers.workers} == {world.farm1.name, world.farm2.name}
    earnings = world.stubs(world.op2)["farm"].GetEarnings(farm_service_pb2.GetEarningsRequest())
    assert {r.farm for r in earnings.rows} == {world.farm2.name}


def test_a_worker_cannot_speak_for_another(world: World):
    with pytest.raises(grpc.RpcError) as exc:
        world.w1.stub.Heartbeat(
            worker_service_pb2.HeartbeatRequest(worker=world.w2.worker), metadata=world.w1.metadata
        )
    assert exc.value.code() == DENIED
    with pytest.raises(grpc.RpcError) as exc:
        world.w1.stub.ReportJobEvents(
            worker_service_pb2.ReportJobEventsRequest(worker=world.w2.worker),
            metadata=world.w1.metadata,
        )
    assert exc.value.code() == DENIED


def test_unknown_and_revoked_keys_are_unauthenticated_health_needs_none(world: World):
    assert (
        code(lambda: world.stubs("rsk_madeup")["job"].ListJobs(job_service_pb2.ListJobsRequest()))
        == UNAUTH
    )
    admin = world.stubs(world.admin)["admin"]
    made = admin.CreateApiKey(
        admin_service_pb2.CreateApiKeyRequest(
            role=admin_service_pb2.ApiKey.CLIENT, principal="carol"
        )
    )
    carol = world.stubs(made.key)["job"]
    assert code(lambda: carol.ListJobs(job_service_pb2.ListJobsRequest())) == OK
    admin.RevokeApiKey(admin_service_pb2.RevokeApiKeyRequest(name=made.name))
    assert code(lambda: carol.ListJobs(job_service_pb2.ListJobsRequest())) == UNAUTH
    listed = admin.ListApiKeys(admin_service_pb2.ListApiKeysRequest()).api_keys
    assert all(k.key == "" for k in listed)  # secrets are never listed
    with grpc.insecure_channel(world.rb.address) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_bad_key_requests(world: World):
    admin = world.stubs(world.admin)["admin"]
    for request, field in [
        (admin_service_pb2.CreateApiKeyRequest(role=0, principal="x"), "role"),
        (admin_service_pb2.CreateApiKeyRequest(role=1, principal="bad name!"), "principal"),
        (admin_service_pb2.CreateApiKeyRequest(role=2, principal="op"), "farm"),
        (admin_service_pb2.CreateApiKeyRequest(role=1, principal="c", farm="farms/x"), "farm"),
    ]:
        with pytest.raises(grpc.RpcError) as exc:
            admin.CreateApiKey(request)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in exc.value.details()


def test_rate_limit_answers_resource_exhausted_with_retry_info(tmp_path: Path):
    rb = start_broker(tmp_path / "rl", rate_limit_per_s=2.0)
    try:
        admin = World.stubs(type("W", (), {"rb": rb})(), rb.admin_key)["admin"]
        key = admin.CreateApiKey(
            admin_service_pb2.CreateApiKeyRequest(
                role=admin_service_pb2.ApiKey.CLIENT, principal="eve"
            )
        ).key
        jobs = World.stubs(type("W", (), {"rb": rb})(), key)["job"]
        codes = [code(lambda: jobs.ListJobs(job_service_pb2.ListJobsRequest())) for _ in range(8)]
        assert codes[:4] == [OK] * 4  # the burst
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[4:]
        with pytest.raises(grpc.RpcError) as exc:
            jobs.ListJobs(job_service_pb2.ListJobsRequest())
        status = rpc_status.from_call(exc.value)
        retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert retry, "RESOURCE_EXHAUSTED must carry google.rpc.RetryInfo"
        # The admin is not limited by eve's bucket.
        assert code(lambda: admin.ListApiKeys(admin_service_pb2.ListApiKeysRequest())) == OK
    finally:
        rb.stop()
