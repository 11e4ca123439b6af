"""WorkerService.Session against a real broker (issue 17): lease renewals on one
bidirectional stream, answered with ``lease_renewed`` between the instructions; a silent
session loses its lease through the ordinary expiry; errors as the other calls give them;
an older agent's unary Heartbeat keeps working."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from broker_harness import RunningBroker, start_broker
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus
from test_broker_api import status_of, submit

from rigshift.v1 import farm_pb2, farm_service_pb2, farm_service_pb2_grpc, job_pb2
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg
from rigshift.v1 import worker_service_pb2 as ws

TTL_S = 1.5
INTERVAL_S = 0.5


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A broker with a short lease (1.5 s) so expiry comes quickly."""
    rb = start_broker(tmp_path / "broker", lease_ttl_s=TTL_S, heartbeat_interval_s=INTERVAL_S)
    yield rb
    rb.stop()


def _agent(address: str, hostname: str = "rig-1") -> ProtocolAgent:
    farm = create_farm(address, hostname)
    agent = ProtocolAgent(address, farm.enrollment_token, gpus(2), hostname=hostname)
    agent.register()
    return agent


def _worker(address: str, name: str) -> farm_pb2.Worker:
    with authed_channel(address) as ch:
        stub = farm_service_pb2_grpc.FarmServiceStub(ch)
        listed = stub.ListWorkers(farm_service_pb2.ListWorkersRequest(parent="farms/-"))
    return next(w for w in listed.workers if w.name == name)


def _until(predicate, timeout: float = 15.0, what: str = ""):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def _renewed(agent: ProtocolAgent) -> ws.LeaseRenewed:
    return agent.next_of("lease_renewed")  # type: ignore[no-any-return]


def test_renewals_on_the_session_keep_the_worker_online_over_several_ttls(broker):
    agent = _agent(broker.address)
    try:
        agent.open_session()
        first = agent.next_instruction()
        assert first.WhichOneof("kind") == "reconcile"  # the instructions come first
        renewed = _renewed(agent)
        assert renewed.status_wanted  # a fresh registration: the broker wants the status
        expiries = [renewed.lease_expire_time.ToNanoseconds()]
        agent.renew(ws.SessionRequest(status=ws.WorkerStatus(environments=["ab" * 32])))
        answer = _renewed(agent)
        assert not answer.status_wanted
        expiries.append(answer.lease_expire_time.ToNanoseconds())
        started = time.monotonic()
        while time.monotonic() - started < 3 * TTL_S:  # renew as an agent would, nothing else
            time.sleep(INTERVAL_S)
            agent.renew()
            expiries.append(_renewed(agent).lease_expire_time.ToNanoseconds())
        assert expiries == sorted(expiries) and expiries[-1] > expiries[0]
        assert _worker(broker.address, agent.worker).state == farm_pb2.Worker.ONLINE
        assert agent.session_error is None
    finally:
        agent.close()


def test_a_silent_session_loses_the_lease_and_the_attempt_is_requeued(broker):
    agent = _agent(broker.address)
    try:
        agent.open_session()
        assert agent.next_instruction().WhichOneof("kind") == "reconcile"
        with authed_channel(broker.address) as ch:
            jobs = jsg.JobServiceStub(ch)
            name = submit(jobs).name
            assignment = agent.next_of("assignment")
            assert assignment.job == name
            agent.start(name, assignment.attempt)
            # No renewal from now on; the stream stays open.
            offline = _until(
                lambda: _worker(broker.address, agent.worker).state == farm_pb2.Worker.OFFLINE,
                what="the lease to expire",
            )
            assert offline
            job = _until(
                lambda: (
                    (j := jobs.GetJob(js.GetJobRequest(name=name))).state == job_pb2.Job.PENDING
                    and j
                ),
                what="the job to be requeued",
            )
        assert job.attempts[0].state != job_pb2.Attempt.RUNNING
    finally:
        agent.close()


def test_an_old_agent_with_unary_heartbeats_still_works(broker):
    agent = _agent(broker.address)
    try:
        agent.connect()
        assert agent.next_instruction().WhichOneof("kind") == "reconcile"
        first = agent.heartbeat().lease_expire_time.ToNanoseconds()
        started = time.monotonic()
        last = first
        while time.monotonic() - started < 2 * TTL_S:
            time.sleep(INTERVAL_S)
            last = agent.heartbeat().lease_expire_time.ToNanoseconds()
        assert last > first
        assert _worker(broker.address, agent.worker).state == farm_pb2.Worker.ONLINE
    finally:
        agent.close()


def test_a_closed_session_ends_the_stream(broker):
    agent = _agent(broker.address)
    try:
        agent.open_session()
        assert agent.next_instruction().WhichOneof("kind") == "reconcile"
        _renewed(agent)
        agent.close_session()
        assert agent.session_ended.wait(10)
        assert agent.session_error is None  # ended with OK
    finally:
        agent.close()


@pytest.mark.parametrize(
    ("first", "later", "code", "field"),
    [
        ("", None, grpc.StatusCode.INVALID_ARGUMENT, "worker"),
        ("workers/someone-else", None, grpc.StatusCode.PERMISSION_DENIED, ""),
        ("jobs/x", None, grpc.StatusCode.INVALID_ARGUMENT, "worker"),
        ("self", "workers/someone-else", grpc.StatusCode.INVALID_ARGUMENT, "worker"),
    ],
)
def test_session_errors_carry_the_status_and_field(broker, first, later, code, field):
    agent = _agent(broker.address)
    try:
        agent.open_session(ws.SessionRequest(worker=agent.worker if first == "self" else first))
        if later is not None:
            agent.renew(ws.SessionRequest(worker=later))
        assert agent.session_ended.wait(10)
        err = agent.session_error
        assert err is not None
        got_code, _, fields = status_of(err)  # type: ignore[arg-type]
        assert got_code == code
        if field:
            assert field in fields
    finally:
        agent.close()


def test_a_session_with_another_workers_credential_is_refused(broker):
    one, two = _agent(broker.address, "rig-1"), _agent(broker.address, "rig-2")
    try:
        one.credential = two.credential
        one.open_session()
        assert one.session_ended.wait(10)
        assert one.session_error is not None
        code, reason, _ = status_of(one.session_error)  # type: ignore[arg-type]
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_WORKER_CREDENTIAL")
    finally:
        one.close()
        two.close()
