"""Curtailment windows over real gRPC (issue 16): Create/List/CancelCurtailment and their
errors, what the agents are told (``Instruction.curtail``, ``Reconcile.curtail``), a spot
job stopped and requeued with a CURTAILED SLA event, the CLI, and a restart that keeps
the windows."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from broker_harness import ManualClock, start_broker
from click.testing import CliRunner
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus

from broker.events import Tick
from broker.invariants import validate_state
from rigshift.v1 import farm_pb2, job_pb2
from rigshift.v1 import farm_service_pb2 as fs
from rigshift.v1 import farm_service_pb2_grpc as fsg
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg
from rigshift_cli import main

C = farm_pb2.Curtailment
State = job_pb2.Job.State


def fields_of(err: grpc.RpcError) -> set[str]:
    status = rpc_status.from_call(err)
    out: set[str] = set()
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            out |= {v.field for v in br.field_violations}
    return out


def stamp(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def broker(tmp_path: Path, clock: ManualClock):
    rb = start_broker(tmp_path / "b", clock=clock, lease_ttl_s=1e6, heartbeat_interval_s=1.0)
    yield rb
    rb.stop()


def tick(rb) -> None:
    rb.call(rb.broker.service.apply(Tick(rb.broker.service.clock())))


@pytest.mark.parametrize(
    ("duration", "start_in", "bad"),
    [
        (0, None, {"duration_seconds"}),
        (7 * 86400 + 1, None, {"duration_seconds"}),
        (600, -120.0, {"start_time"}),
        (0, -120.0, {"duration_seconds", "start_time"}),
    ],
)
def test_create_checks_each_field(broker, clock, duration, start_in, bad):
    farm = create_farm(broker.address)
    request = fs.CreateCurtailmentRequest(farm=farm.name, duration_seconds=duration)
    if start_in is not None:
        request.start_time.CopyFrom(stamp(clock() + start_in))
    with authed_channel(broker.address) as ch, pytest.raises(grpc.RpcError) as err:
        fsg.FarmServiceStub(ch).CreateCurtailment(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields_of(err.value) == bad


def test_create_list_cancel_and_their_errors(broker, clock):
    farm = create_farm(broker.address)
    with authed_channel(broker.address) as ch:
        farms = fsg.FarmServiceStub(ch)
        later = farms.CreateCurtailment(
            fs.CreateCurtailmentRequest(
                farm=farm.name,
                start_time=stamp(clock() + 3600),
                duration_seconds=3 * 3600,
                reason="ERCOT EEA2",
            )
        )
        assert later.state == C.SCHEDULED and later.name.startswith(f"{farm.name}/curtailments/")
        assert later.end_time.seconds - later.start_time.seconds == 3 * 3600
        assert later.created_by and later.reason == "ERCOT EEA2"
        now = farms.CreateCurtailment(
            fs.CreateCurtailmentRequest(farm=farm.name, duration_seconds=60)
        )
        assert now.state == C.ACTIVE
        listed = farms.ListCurtailments(fs.ListCurtailmentsRequest(farm=farm.name))
        assert [c.name for c in listed.curtailments] == [later.name, now.name]  # newest first
        gone = farms.CancelCurtailment(fs.CancelCurtailmentRequest(name=later.name))
        assert gone.state == C.CANCELLED
        with pytest.raises(grpc.RpcError) as err:
            farms.CancelCurtailment(fs.CancelCurtailmentRequest(name=later.name))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        clock.advance(61)
        tick(broker)
        with pytest.raises(grpc.RpcError) as err:
            farms.CancelCurtailment(fs.CancelCurtailmentRequest(name=now.name))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # it ended
        assert (
            list(farms.ListCurtailments(fs.ListCurtailmentsRequest(farm=farm.name)).curtailments)
            == []
        )
        past = farms.ListCurtailments(fs.ListCurtailmentsRequest(farm=farm.name, include_past=True))
        assert [c.state for c in past.curtailments] == [C.CANCELLED, C.ENDED]
        unknown = f"{farm.name}/curtailments/nope"
        create = fs.CreateCurtailmentRequest(farm="farms/no", duration_seconds=6)
        for call, request in (
            (farms.CreateCurtailment, create),
            (farms.ListCurtailments, fs.ListCurtailmentsRequest(farm="farms/no")),
            (farms.CancelCurtailment, fs.CancelCurtailmentRequest(name=unknown)),
        ):  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                call(request)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_window_stops_spot_work_tells_the_agents_and_survives_a_restart(tmp_path, clock):
    home = tmp_path / "b"
    rb = start_broker(home, clock=clock, lease_ttl_s=1e6, heartbeat_interval_s=1.0)
    farm = create_farm(rb.address)
    agent = ProtocolAgent(rb.address, farm.enrollment_token, gpus(1))
    agent.register()
    agent.connect()
    assert not agent.next_of("reconcile").HasField("curtail")
    with authed_channel(rb.address) as ch:
        jobs = jsg.JobServiceStub(ch)
        spec = job_pb2.JobSpec(command=["train"], gpu_count=1, tier=job_pb2.SPOT)
        name = jobs.CreateJob(js.CreateJobRequest(spec=spec)).name
        a = agent.next_of("assignment")
        agent.start(a.job, a.attempt)
        window = fsg.FarmServiceStub(ch).CreateCurtailment(
            fs.CreateCurtailmentRequest(farm=farm.name, duration_seconds=600, reason="grid")
        )
        got: dict = {}
        while len(got) < 2:  # the curtail instruction, then the cancellation
            instruction = agent.next_instruction()
            kind = instruction.WhichOneof("kind")
            if kind in ("curtail", "cancellation"):
                got[kind] = getattr(instruction, kind)
        cancel = got["cancellation"]
        assert (cancel.job, cancel.attempt) == (a.job, a.attempt)
        assert "curtail" in cancel.reason
        curtail = got["curtail"]
        assert curtail.active and curtail.reason == "grid"
        assert curtail.end_time.seconds == window.end_time.seconds
        job = jobs.GetJob(js.GetJobRequest(name=name))
        assert job.state == State.PENDING
        assert [e.kind for e in job.sla_events] == [job_pb2.SlaEvent.CURTAILED]
        rb.scheduled()
        job = jobs.GetJob(js.GetJobRequest(name=name))
        assert job.state == State.PENDING  # not back on the curtailed farm
        assert any("curtailed until" in r.message for r in job.pending_reasons)
    agent.close()
    rb.stop()
    validate_state(rb.broker.service.core)

    rb2 = start_broker(home, clock=clock, lease_ttl_s=1e6, heartbeat_interval_s=1.0)
    try:
        with authed_channel(rb2.address) as ch:
            listed = fsg.FarmServiceStub(ch).ListCurtailments(
                fs.ListCurtailmentsRequest(farm=farm.name)
            )
            assert [(c.name, c.state) for c in listed.curtailments] == [(window.name, C.ACTIVE)]
        again = ProtocolAgent(rb2.address, farm.enrollment_token, gpus(1))
        again.worker, again.credential = agent.worker, agent.credential
        again.connect()
        reconcile = again.next_of("reconcile")
        assert reconcile.curtail.active and reconcile.curtail.reason == "grid"
        clock.advance(601)
        tick(rb2)
        assert not again.next_of("curtail").active  # the window ended
        again.close()
    finally:
        rb2.stop()


def test_cli_curtail_list_and_cancel(broker):
    farm = create_farm(broker.address)
    farm_id = farm.name.removeprefix("farms/")

    def rs(*args: str):
        result = CliRunner().invoke(main, ["farm", "--broker", broker.address, *args])
        assert result.exit_code == 0, result.output
        return result.stdout

    made = rs("curtail", farm_id, "--start", "now", "--duration", "10m", "--reason", "peak")
    assert "ACTIVE" in made and "/curtailments/" in made
    cid = made.split()[0].rsplit("/", 1)[-1]
    listed = rs("curtailments", farm_id)
    assert cid in listed and "peak" in listed
    assert "CANCELLED" in rs("curtailments", farm_id, "--cancel", cid)
    assert rs("curtailments", farm_id) == "no curtailment windows\n"
    assert cid in rs("curtailments", farm_id, "--all")
    bad = CliRunner().invoke(
        main, ["farm", "--broker", broker.address, "curtail", farm_id, "--duration", "soon"]
    )
    assert bad.exit_code == 2 and "duration" in bad.output
