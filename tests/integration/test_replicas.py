"""Broker replicas on one real PostgreSQL: no double booking, and failover of the leader.

Two `rigshift broker serve --replica` processes share a throwaway PostgreSQL; test
agents speaking the real protocol are spread over both; the leader is killed with
SIGKILL and the other replica must take over with every job and binding intact.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
import sqlalchemy
from broker_harness import start_broker
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus

from broker.core import BrokerCore
from broker.errors import StaleWriter
from broker.events import JobSubmitted, SchedulePass, Writes
from broker.model import JobSpec
from broker.replica import LEADER_LOCK
from broker.store import Store
from rigshift.credentials import lookup_api_key
from rigshift.v1 import job_pb2
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg
from rigshift.v1 import worker_service_pb2_grpc as wsg

State = job_pb2.Job.State
EXE = Path(sys.executable).parent / "rigshift"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    """One `rigshift broker serve --replica` process; its output is kept for failures."""

    def __init__(self, db: str, home: Path, artifacts: Path, *, lease_ttl_s: float = 15) -> None:
        self.address = f"127.0.0.1:{_port()}"
        self.proc = subprocess.Popen(
            [
                str(EXE),
                "broker",
                "serve",
                "--replica",
                "--db",
                db,
                "--listen",
                self.address,
                "--home",
                str(home),
                "--artifact-dir",
                str(artifacts),
                "--lease-ttl-s",
                str(lease_ttl_s),
                "--heartbeat-interval-s",
                str(lease_ttl_s / 3),
                "--metrics-listen",
                "127.0.0.1:0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.ready.wait(60), self.output()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening on" in line:
                self.ready.set()

    def output(self) -> str:
        return "".join(self.lines)

    def metrics_url(self) -> str:
        """The replica's /metrics URL (from its startup line)."""
        return next(line.split()[-1] for line in self.lines if "metrics on http://" in line)

    def sd(self) -> list[dict]:
        """The replica's /sd (Prometheus HTTP service discovery) answer."""
        url = self.metrics_url().replace("/metrics", "/sd")
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            got = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return got.status == health_pb2.HealthCheckResponse.SERVING


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _leader_epoch(db: str) -> tuple[str, int]:
    engine = sqlalchemy.create_engine(db)
    try:
        with engine.connect() as conn:
            row = conn.execute(sqlalchemy.text("SELECT replica, epoch FROM broker_leader")).one()
    finally:
        engine.dispose()
    return str(row[0]), int(row[1])


class Tracker:
    """Every binding the agents were given, checked for overlaps on one GPU."""

    def __init__(self) -> None:
        self.open: dict[tuple[str, int], tuple[str, int]] = {}
        self.bindings: dict[tuple[str, int], list[tuple[str, int]]] = defaultdict(list)

    def bind(self, worker: str, assignment) -> None:  # type: ignore[no-untyped-def]
        for gpu in assignment.gpu_indices:
            key = (worker, gpu)
            held = self.open.get(key)
            assert held is None or held == (assignment.job, assignment.attempt), (
                f"GPU {key} bound to {assignment.job}#{assignment.attempt} while {held} runs"
            )
            self.open[key] = (assignment.job, assignment.attempt)
            self.bindings[key].append((assignment.job, assignment.attempt))

    def release(self, job: str, attempt: int) -> None:
        for key, held in list(self.open.items()):
            if held == (job, attempt):
                del self.open[key]


def _move(agent: ProtocolAgent, address: str) -> None:
    """Point a test agent at another replica (same worker identity and credential)."""
    agent.close()
    agent.channel = grpc.insecure_channel(address)
    agent.stub = wsg.WorkerServiceStub(agent.channel)
    while not agent.instructions.empty():
        agent.instructions.get_nowait()
    agent.connect()


def test_two_replicas_share_the_work_and_fail_over(tmp_path: Path, fresh_postgres_url: str):
    db = fresh_postgres_url
    artifacts = tmp_path / "artifacts"
    first = Replica(db, tmp_path / "r1", artifacts)
    second = None
    agents: list[ProtocolAgent] = []
    try:
        assert "(leader)" in first.output(), first.output()
        second = Replica(db, tmp_path / "r2", artifacts)
        assert "follower of" in second.output(), second.output()
        key = lookup_api_key(first.address)
        assert key, "the leader saved the first admin key for its public address"
        _wait(lambda: _serving(second.address), 10, "the follower to find the leader")

        farm = create_farm(second.address)  # through the follower: forwarded to the leader
        for i, replica in enumerate((first, second)):
            agent = ProtocolAgent(replica.address, farm.enrollment_token, gpus(2), f"rig-{i}")
            agent.metrics_address = f"127.0.0.1:{9100 + i}"
            agent.register()
            agent.connect()
            agent.next_of("reconcile")
            agents.append(agent)
        # Prometheus may ask any replica for the agents' exporters (a follower reads the DB).
        want = [["127.0.0.1:9100"], ["127.0.0.1:9101"]]
        assert sorted(g["targets"] for g in first.sd()) == want
        _wait(lambda: sorted(g["targets"] for g in second.sd()) == want, 15, "follower /sd")
        assert {g["labels"]["gpu_model"] for g in second.sd()} == {"RTX 3090"}
        tracker = Tracker()
        names = []
        for i in range(6):
            via = (first, second)[i % 2].address
            with authed_channel(via, key) as ch:
                job = jsg.JobServiceStub(ch).CreateJob(
                    js.CreateJobRequest(spec=job_pb2.JobSpec(command=["train"], gpu_count=1))
                )
            names.append(job.name)

        def collect(count: int) -> list[tuple[ProtocolAgent, object]]:
            got = []
            deadline = time.monotonic() + 20
            while len(got) < count:
                assert time.monotonic() < deadline, f"only {len(got)} of {count} assignments"
                for agent in agents:
                    while not agent.instructions.empty():
                        instruction = agent.instructions.get_nowait()
                        if instruction.WhichOneof("kind") == "assignment":
                            tracker.bind(agent.worker, instruction.assignment)
                            got.append((agent, instruction.assignment))
                time.sleep(0.05)
            return got

        running = collect(4)  # 4 GPUs over two rigs, 6 jobs: 4 bound, 2 wait
        for agent, a in running:
            agent.start(a.job, a.attempt)
        done = running[:2]
        for agent, a in done:
            agent.finish(a.job, a.attempt)
            tracker.release(a.job, a.attempt)
        running = running[2:] + collect(2)
        for agent, a in running[2:]:
            agent.start(a.job, a.attempt)

        # The leader dies; the follower must lead, with the running attempts intact.
        killed_at = time.monotonic()
        first.kill()
        _wait(lambda: _leader_epoch(db)[1] == 2, 20, "a new leader")
        assert _leader_epoch(db)[0] != "" and "leads (epoch 2)" in second.output()
        _wait(lambda: _serving(second.address), 10, "the new leader to serve")
        print(f"failover: the follower served as leader {time.monotonic() - killed_at:.2f} s after")
        for agent in agents:
            _move(agent, second.address)
            reconcile = agent.next_of("reconcile")
            adopted = {(a.job, a.attempt) for a in reconcile.assignments}
            mine = {(a.job, a.attempt) for ag, a in running if ag is agent}
            assert adopted == mine, "the new leader adopted exactly the running attempts"
        with authed_channel(second.address, key) as ch:
            stub = jsg.JobServiceStub(ch)
            states = [stub.GetJob(js.GetJobRequest(name=n)).state for n in names]
        assert states.count(State.SUCCEEDED) == 2 and states.count(State.RUNNING) == 4

        for agent, a in running:
            agent.heartbeat()
            agent.finish(a.job, a.attempt)
            tracker.release(a.job, a.attempt)
        with authed_channel(second.address, key) as ch:
            stub = jsg.JobServiceStub(ch)

            def all_done() -> bool:
                return all(
                    stub.GetJob(js.GetJobRequest(name=n)).state == State.SUCCEEDED for n in names
                )

            _wait(all_done, 20, "every job to succeed")
        # Each job ran exactly once, and no GPU ever held two attempts at once (Tracker).
        attempts = [b for bs in tracker.bindings.values() for b in bs]
        assert sorted(attempts) == sorted((n, 1) for n in names)
        verify = subprocess.run(
            [str(EXE), "admin", "verify-ledger", "--db", db], capture_output=True, text=True
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        for agent in agents:
            agent.close()
        if second is not None:
            second.stop()
        first.stop()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_stale_writer_cannot_bind_a_gpu_twice(tmp_path: Path, backend: str, request):  # type: ignore[no-untyped-def]
    """Two cores believing they own one database: the second bind of GPU 0 is refused."""
    db = (
        request.getfixturevalue("fresh_postgres_url")
        if backend == "postgresql"
        else f"sqlite:///{tmp_path / 'broker.db'}"
    )
    rb = start_broker(tmp_path / "b", db_url=db)
    try:
        farm = create_farm(rb.address)
        agent = ProtocolAgent(rb.address, farm.enrollment_token, gpus(1))
        agent.register()
        agent.connect()
        # A second "leader" loads the state while GPU 0 is still free.
        stale_store = Store(db)
        stale = BrokerCore()
        stale_store.load(stale)
        with authed_channel(rb.address) as ch:
            jsg.JobServiceStub(ch).CreateJob(
                js.CreateJobRequest(spec=job_pb2.JobSpec(command=["a"], gpu_count=1))
            )
        assert agent.next_of("assignment").gpu_indices == [0]  # the real broker bound it
        now = time.time()
        commands = stale.handle(
            JobSubmitted(now, job_id="stale-b", owner="x", spec=JobSpec(command=("b",)))
        )
        commands += stale.handle(SchedulePass(now))
        assert any(type(c).__name__ == "Assign" for c in commands), "the stale core binds GPU 0"
        with pytest.raises(StaleWriter) as err:
            stale_store.save(stale, Writes.of(commands))
        assert err.value.metadata["gpu_index"] == "0"
        # Nothing of the refused transaction was written: the job row rolled back too.
        engine = sqlalchemy.create_engine(db)
        with engine.connect() as conn:
            found = conn.execute(sqlalchemy.text("SELECT count(*) FROM jobs WHERE id = 'stale-b'"))
            assert found.scalar() == 0
        engine.dispose()
        stale_store.close()
    finally:
        agent.close()
        rb.stop()


def test_a_leader_that_loses_its_lock_session_fences_itself(
    tmp_path: Path, fresh_postgres_url: str
):
    """PostgreSQL ends the leader's lock session: it must stop leading and exit non-zero."""
    db = fresh_postgres_url
    first = Replica(db, tmp_path / "r1", tmp_path / "artifacts")
    second = Replica(db, tmp_path / "r2", tmp_path / "artifacts")
    try:
        assert "(leader)" in first.output() and "follower of" in second.output()
        engine = sqlalchemy.create_engine(db, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            ended = conn.execute(
                sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND objid = :k AND granted"
                ),
                {"k": LEADER_LOCK},
            ).all()
        engine.dispose()
        assert len(ended) == 1
        assert first.proc.wait(20) != 0
        assert "stops leading" in first.output()
        _wait(lambda: _leader_epoch(db)[1] == 2, 20, "the follower to lead")
        _wait(lambda: _serving(second.address), 10, "the new leader to serve")
        key = lookup_api_key(first.address)
        with authed_channel(second.address, key) as ch:
            listed = jsg.JobServiceStub(ch).ListJobs(js.ListJobsRequest())
        assert list(listed.jobs) == []
    finally:
        second.stop()
        first.stop()


def test_clients_can_be_given_every_replica_in_one_target(tmp_path: Path):
    """`--broker ipv4:A,B` (gRPC's own multi-address target): a dead first address is skipped."""
    from client import Client

    rb = start_broker(tmp_path / "b")
    try:
        target = f"ipv4:127.0.0.1:{_port()},{rb.address}"
        with Client(target, api_key=rb.admin_key, timeout_s=10) as rs:
            farm = rs.create_farm("multi-address")
            assert rs.get_farm(farm.name).display_name == "multi-address"
    finally:
        rb.stop()
