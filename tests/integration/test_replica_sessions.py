"""Followers hold agent sessions (issue 17, docs/replicas.md "Sessions on followers").

Real PostgreSQL, real `rigshift broker serve --replica` processes, and a small test
client speaking WorkerService/Session over raw stubs. A follower answers the renewals
itself and keeps the leases alive on the leader with one RenewLeases digest per
interval; instructions reach the agent through the follower; at a leader failover a
surviving follower's sessions stay open and its workers keep their leases.
"""

from __future__ import annotations

import queue
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus
from test_replicas import Replica, _leader_epoch, _serving, _wait

from rigshift.credentials import lookup_api_key
from rigshift.v1 import farm_pb2, job_pb2
from rigshift.v1 import farm_service_pb2 as fs
from rigshift.v1 import farm_service_pb2_grpc as fsg
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg
from rigshift.v1 import worker_service_pb2 as ws
from rigshift.v1 import worker_service_pb2_grpc as wsg

TTL_S = 3.0
WorkerState = farm_pb2.Worker.State


class SessionClient:
    """One agent's Session: a renewal every TTL/3, instructions collected on a thread."""

    def __init__(self, address: str, worker: str, credential: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.worker = worker
        self.instructions: queue.Queue[ws.Instruction] = queue.Queue()
        self.renewed = 0
        self.first_kind = ""
        self.ended = threading.Event()
        self.error: grpc.RpcError | None = None
        self._requests: queue.Queue[ws.SessionRequest | None] = queue.Queue()
        self._stop = threading.Event()
        self._call = wsg.WorkerServiceStub(self.channel).Session(
            self._outgoing(), metadata=(("authorization", f"Bearer {credential}"),)
        )
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._renew, daemon=True).start()

    def _outgoing(self):  # type: ignore[no-untyped-def]
        yield ws.SessionRequest(worker=self.worker, status=ws.WorkerStatus())
        while (request := self._requests.get()) is not None:
            yield request

    def _renew(self) -> None:
        while not self._stop.wait(TTL_S / 3):
            self._requests.put(ws.SessionRequest())

    def _pump(self) -> None:
        try:
            for instruction in self._call:
                self.first_kind = self.first_kind or str(instruction.WhichOneof("kind"))
                if instruction.WhichOneof("kind") == "lease_renewed":
                    self.renewed += 1
                else:
                    self.instructions.put(instruction)
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.ended.set()

    def next_of(self, kind: str, timeout: float = 15.0):  # type: ignore[no-untyped-def]
        """The next instruction of this kind (reconcile/assignment/...)."""
        while True:
            instruction = self.instructions.get(timeout=timeout)
            if instruction.WhichOneof("kind") == kind:
                return getattr(instruction, kind)

    def close(self) -> None:
        self._stop.set()
        self._requests.put(None)
        self._call.cancel()
        self.channel.close()


def _metric(replica: Replica, name: str, **labels: str) -> float:
    """A sample of the replica's /metrics (0 when absent)."""
    with urllib.request.urlopen(replica.metrics_url(), timeout=5) as resp:
        body = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


class StateWatch:
    """Polls ListWorkers (through any replica that answers) and records every state seen."""

    def __init__(self, addresses: list[str], key: str) -> None:
        self.seen: dict[str, set[int]] = {}
        self._addresses = addresses
        self._key = key
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(0.2):
            address = self._addresses[i % len(self._addresses)]
            i += 1
            try:
                with authed_channel(address, self._key) as ch:
                    listed = fsg.FarmServiceStub(ch).ListWorkers(fs.ListWorkersRequest(), timeout=2)
            except grpc.RpcError:
                continue  # no leader for a moment: the next poll asks again
            for w in listed.workers:
                self.seen.setdefault(w.name, set()).add(w.state)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _register(address: str, token: str, hostname: str, n_gpus: int = 1) -> ProtocolAgent:
    agent = ProtocolAgent(address, token, gpus(n_gpus), hostname)
    agent.register()
    return agent


def _create_job(address: str, key: str) -> str:
    with authed_channel(address, key) as ch:
        job = jsg.JobServiceStub(ch).CreateJob(
            js.CreateJobRequest(spec=job_pb2.JobSpec(command=["train"], gpu_count=1))
        )
    return str(job.name)


def _get_job(address: str, key: str, name: str) -> job_pb2.Job:
    with authed_channel(address, key) as ch:
        return jsg.JobServiceStub(ch).GetJob(js.GetJobRequest(name=name))


def test_a_follower_session_renews_the_lease_by_digest_and_relays_instructions(
    tmp_path: Path, fresh_postgres_url: str
):
    db = fresh_postgres_url
    leader = Replica(db, tmp_path / "r1", tmp_path / "artifacts", lease_ttl_s=TTL_S)
    follower = None
    agent = session = watch = None
    try:
        assert "(leader)" in leader.output(), leader.output()
        follower = Replica(db, tmp_path / "r2", tmp_path / "artifacts", lease_ttl_s=TTL_S)
        _wait(lambda: _serving(follower.address), 10, "the follower to find the leader")
        key = lookup_api_key(leader.address)
        farm = create_farm(follower.address)
        agent = _register(follower.address, farm.enrollment_token, "rig-f")
        session = SessionClient(follower.address, agent.worker, agent.credential)
        assert list(session.next_of("reconcile").assignments) == []  # relayed from the leader
        assert session.first_kind == "reconcile"  # before any renewal's answer
        watch = StateWatch([leader.address], key)
        # Several TTLs with nothing but the follower's session: the worker stays ONLINE.
        started = time.monotonic()
        _wait(lambda: time.monotonic() - started > 3 * TTL_S, 4 * TTL_S + 5, "three TTLs")
        watch.stop()
        assert watch.seen[agent.worker] == {WorkerState.ONLINE}
        assert session.renewed >= 6 and not session.ended.is_set()
        # The leader renewed the lease through digests, not per-agent RPCs.
        assert _metric(leader, "rigshift_broker_replica_lease_renewals_total") >= 3
        calls = {
            method: _metric(
                leader, "rigshift_grpc_requests_total", method=f"rigshift.v1.WorkerService/{method}"
            )
            for method in ("RegisterWorker", "Heartbeat", "Session")
        }
        assert calls == {"RegisterWorker": 1, "Heartbeat": 0, "Session": 0}  # forwarded: 1
        assert _metric(leader, "rigshift_worker_lease_expirations_total") == 0
        assert _metric(follower, "rigshift_broker_replica_sessions") == 1
        assert _metric(follower, "rigshift_broker_replica_digests_sent_total") >= 3

        # An assignment the leader makes reaches the agent through the follower's session.
        job = _create_job(leader.address, key)
        assignment = session.next_of("assignment")
        assert assignment.job == job and list(assignment.gpu_indices) == [0]
    finally:
        for closable in (session, agent):
            if closable is not None:
                closable.close()
        if watch is not None:
            watch.stop()
        if follower is not None:
            follower.stop()
        leader.stop()


def test_a_session_with_another_workers_credential_is_refused(
    tmp_path: Path, fresh_postgres_url: str
):
    db = fresh_postgres_url
    leader = Replica(db, tmp_path / "r1", tmp_path / "artifacts", lease_ttl_s=TTL_S)
    follower = Replica(db, tmp_path / "r2", tmp_path / "artifacts", lease_ttl_s=TTL_S)
    try:
        _wait(lambda: _serving(follower.address), 10, "the follower to find the leader")
        farm = create_farm(follower.address)
        a = _register(follower.address, farm.enrollment_token, "rig-a")
        b = _register(follower.address, farm.enrollment_token, "rig-b")
        for worker, credential, code in (
            (a.worker, b.credential, grpc.StatusCode.PERMISSION_DENIED),
            (a.worker, "rswc_not-a-credential", grpc.StatusCode.UNAUTHENTICATED),
        ):
            session = SessionClient(follower.address, worker, credential)
            assert session.ended.wait(10)
            assert session.error is not None and session.error.code() == code
            session.close()
        a.close()
        b.close()
    finally:
        follower.stop()
        leader.stop()


def test_a_followers_agents_keep_their_leases_across_a_leader_failover(
    tmp_path: Path, fresh_postgres_url: str
):
    db = fresh_postgres_url
    first = Replica(db, tmp_path / "r1", tmp_path / "artifacts", lease_ttl_s=TTL_S)
    followers: list[Replica] = []
    sessions: dict[str, SessionClient] = {}
    agents: dict[str, ProtocolAgent] = {}
    watch = None
    try:
        assert "(leader)" in first.output(), first.output()
        for i in (2, 3):
            followers.append(
                Replica(db, tmp_path / f"r{i}", tmp_path / "artifacts", lease_ttl_s=TTL_S)
            )
        for f in followers:
            _wait(lambda f=f: _serving(f.address), 10, "the followers to find the leader")
        key = lookup_api_key(first.address)
        farm = create_farm(first.address)
        jobs: dict[str, str] = {}
        for f in followers:
            agent = agents[f.address] = _register(f.address, farm.enrollment_token, f.address)
            session = sessions[f.address] = SessionClient(f.address, agent.worker, agent.credential)
            session.next_of("reconcile")
            job = _create_job(first.address, key)
            assignment = session.next_of("assignment")
            assert assignment.job == job
            agent.start(assignment.job, assignment.attempt)  # reported through the follower
            jobs[f.address] = job
        watch = StateWatch([f.address for f in followers], key)

        first.kill()
        _wait(lambda: _leader_epoch(db)[1] == 2, 20, "a new leader")
        leaders = [f for f in followers if "leads (epoch 2)" in f.output()]
        assert len(leaders) == 1, [f.output() for f in followers]
        new_leader = leaders[0]
        survivor = next(f for f in followers if f is not new_leader)
        # The new leader ended the sessions it held as a follower: its agents reconnect.
        assert sessions[new_leader.address].ended.wait(10)
        ended = sessions[new_leader.address].error
        assert ended is not None and ended.code() == grpc.StatusCode.UNAVAILABLE

        # The survivor's session stays open; the new leader's Reconcile reaches it and
        # lists the attempt that kept running.
        kept = sessions[survivor.address]
        reconcile = kept.next_of("reconcile", timeout=20)
        assert [(a.job, a.attempt) for a in reconcile.assignments] == [(jobs[survivor.address], 1)]
        _wait(lambda: _serving(new_leader.address), 10, "the new leader to serve")
        started = time.monotonic()
        _wait(lambda: time.monotonic() - started > 2 * TTL_S, 3 * TTL_S + 5, "two TTLs")
        watch.stop()
        assert not kept.ended.is_set(), kept.error
        assert watch.seen[agents[survivor.address].worker] == {WorkerState.ONLINE}
        job = _get_job(survivor.address, key, jobs[survivor.address])
        assert job.state == job_pb2.Job.State.RUNNING and job.attempt_count == 1  # not requeued
        assert _metric(new_leader, "rigshift_broker_replica_lease_renewals_total") >= 1
        assert (
            _metric(
                new_leader,
                "rigshift_grpc_requests_total",
                method="rigshift.v1.WorkerService/Heartbeat",
            )
            == 0
        )
    finally:
        if watch is not None:
            watch.stop()
        for closable in (*sessions.values(), *agents.values()):
            closable.close()
        for f in followers:
            f.stop()
        first.stop()
