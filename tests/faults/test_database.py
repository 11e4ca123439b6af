"""The broker's database goes away, under load, and comes back.

- PostgreSQL (a cluster of this module's own, so stopping it touches no other test) is
  stopped with ``pg_ctl stop -m fast`` for 30 s while clients submit jobs with request
  ids and protocol agents heartbeat and report events over real gRPC. The broker must
  answer reads from memory, refuse writes with UNAVAILABLE + RetryInfo (never INTERNAL
  or UNKNOWN), keep every lease, report NOT_SERVING after ``db_outage_unhealthy_s`` and
  resume without a restart once PostgreSQL is back: every job exactly once, every
  event applied once, the ledger balanced.
- SQLite: another process holds the write lock beyond the busy timeout; the database
  file is read-only. Same answers, and the broker resumes when the file is writable.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy
from broker_harness import RunningBroker, start_broker
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from client import Client
from client.errors import RigshiftError, Unavailable
from rigshift.v1 import farm_service_pb2 as fs
from rigshift.v1 import farm_service_pb2_grpc as fsg
from rigshift.v1 import job_pb2
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg
from rigshift.v1 import worker_service_pb2 as ws

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus

EXE = Path(sys.executable).parent / "rigshift"
OUTAGE_S = 30.0
UNHEALTHY_S = 8.0
State = job_pb2.Job.State


# --- a PostgreSQL cluster this module may stop and start --------------------------------


class PgCluster:
    """A throwaway cluster (Debian's postgresql) run as the ``postgres`` user."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            if os.environ.get("CI"):
                pytest.fail("PostgreSQL is not installed (`.ci/run` installs it)")
            pytest.skip("PostgreSQL server not installed (apt-get install postgresql)")
        self.bindir = Path(bins[-1]).parent
        # Not under pytest's tmp dir: its parents are 0700 root and postgres must get in.
        self.root = Path(tempfile.mkdtemp(prefix="rigshift-pg-outage-"))
        shutil.chown(self.root, "postgres")
        self.data = self.root / "data"
        self.as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._run("initdb", "-D", str(self.data), "-U", "rigshift", "--auth=trust", "-E", "UTF8")
        self.start()
        subprocess.run(
            [
                str(self.bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "rigshift",
                "rigshift",
            ],
            check=True,
            capture_output=True,
        )
        self.url = f"postgresql+psycopg://rigshift@127.0.0.1:{self.port}/rigshift"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_pg, str(self.bindir / tool), *args], check=True, capture_output=True
        )

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "log")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", log, "-w", "start")

    def stop(self) -> None:
        """What a maintenance restart does: end every session, refuse new ones."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        status = subprocess.run(
            [*self.as_pg, str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
            capture_output=True,
        )
        return status.returncode == 0

    def remove(self) -> None:
        subprocess.run(
            [
                *self.as_pg,
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
        )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    cluster = PgCluster()
    yield cluster
    cluster.remove()


# --- helpers ---------------------------------------------------------------------------


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        got = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(got.status)


def _details(err: grpc.RpcError) -> tuple[str, float | None]:
    """(ErrorInfo reason, RetryInfo delay in s) of a failed call."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"{err.code()} without a rich status: {err.details()}"
    reason, delay = "", None
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reason = info.reason
        elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            d.Unpack(retry)
            delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return reason, delay


def _spec() -> job_pb2.JobSpec:
    return job_pb2.JobSpec(command=["train"], gpu_count=1)


class Errors:
    """What went wrong anywhere in the load, by status code (UNAVAILABLE is expected)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.codes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def add(self, code: grpc.StatusCode, reason: str, where: str, message: str) -> None:
        with self.lock:
            self.codes[code.name] += 1
            if code == grpc.StatusCode.UNAVAILABLE:
                self.reasons[reason] += 1
            else:
                self.unexpected.append(f"{where}: {code.name} {reason} {message}")


class Submitter(threading.Thread):
    """A client submitting jobs with request ids, retrying each until the broker takes it."""

    def __init__(self, n: int, rb: RunningBroker, stop: threading.Event, errors: Errors):
        super().__init__(daemon=True, name=f"client-{n}")
        self.n, self.rb, self.stop_event, self.errors = n, rb, stop, errors
        self.created: dict[str, str] = {}  # request id -> job name

    def run(self) -> None:
        with Client(self.rb.address, api_key=self.rb.admin_key, timeout_s=30) as rs:
            k = 0
            while not self.stop_event.is_set():
                request_id = f"client{self.n}-{k}"
                while True:
                    try:
                        job = rs.create_job(["train"], gpu_count=1, request_id=request_id)
                        break
                    except Unavailable as err:  # the SDK's own retries ran out: ours go on
                        self.errors.add(err.code, err.reason, "CreateJob", str(err))
                        time.sleep(0.2)
                    except RigshiftError as err:
                        self.errors.add(err.code, err.reason, "CreateJob", str(err))
                        return
                self.created[request_id] = job.name
                k += 1
                time.sleep(0.15)


class Rig:
    """A protocol agent that heartbeats, runs what it is assigned and reports it, resending
    each report with the same sequence numbers until the broker acknowledges it."""

    def __init__(self, address: str, token: str, name: str, errors: Errors) -> None:
        self.agent = ProtocolAgent(address, token, gpus(2), name)
        self.agent.register()
        self.agent.connect()
        self.agent.next_of("reconcile")
        self.errors = errors
        self.heartbeat_failures: list[str] = []
        self.sent_logs: list[tuple[str, int, int, str]] = []
        self.reports = 0
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._heartbeats, daemon=True),
            threading.Thread(target=self._work, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _heartbeats(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.agent.heartbeat()
            except grpc.RpcError as err:
                self.heartbeat_failures.append(f"{err.code().name}: {err.details()}")

    def _report(self, events: list[ws.JobEvent]) -> None:
        while not self.stop.is_set():
            try:
                self.agent.report(*events)
                self.reports += 1
                return
            except grpc.RpcError as err:
                self.errors.add(err.code(), _details(err)[0], "ReportJobEvents", err.details())
                time.sleep(0.2)

    def _work(self) -> None:
        try:
            self._run_assignments()
        except Exception as err:  # a bug of the test: make it fail, not hang
            self.errors.unexpected.append(f"rig thread: {err!r}")

    def _run_assignments(self) -> None:
        a = self.agent
        while not self.stop.is_set():
            try:
                instruction = a.next_instruction(timeout=0.2)
            except Exception:  # queue.Empty
                continue
            if instruction.WhichOneof("kind") != "assignment":
                continue
            job, attempt = instruction.assignment.job, instruction.assignment.attempt
            logs = [f"{job}#{attempt} starting\n", f"{job}#{attempt} done\n"]
            first = [
                a.event(job, attempt, started=ws.Started()),
                a.event(job, attempt, log=ws.LogOutput(data=logs[0])),
            ]
            second = [
                a.event(job, attempt, log=ws.LogOutput(data=logs[1])),
                a.event(job, attempt, finished=ws.Finished(exit_code=0, energy_joules=1000)),
            ]
            for e in (*first, *second):
                if e.WhichOneof("kind") == "log":
                    self.sent_logs.append((job, attempt, e.sequence, e.log.data))
            self._report(first)
            time.sleep(0.1)
            self._report(second)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)
        self.agent.close()


# --- PostgreSQL ------------------------------------------------------------------------


def test_postgresql_stopped_under_load_then_started(tmp_path: Path, pg: PgCluster):
    rb = start_broker(
        tmp_path / "broker",
        db_url=pg.url,
        lease_ttl_s=15.0,
        heartbeat_interval_s=1.0,
        db_outage_unhealthy_s=UNHEALTHY_S,
    )
    errors = Errors()
    stop_clients = threading.Event()
    rigs: list[Rig] = []
    clients: list[Submitter] = []
    try:
        farm = create_farm(rb.address)
        rigs = [Rig(rb.address, farm.enrollment_token, f"rig-{i}", errors) for i in range(2)]
        clients = [Submitter(i, rb, stop_clients, errors) for i in range(3)]
        for c in clients:
            c.start()
        _wait(lambda: sum(len(c.created) for c in clients) >= 15, 30, "load before the outage")
        assert _health(rb.address) == health_pb2.HealthCheckResponse.SERVING

        pg.stop()
        stopped_at = time.monotonic()
        svc = rb.broker.service
        assert svc is not None
        with authed_channel(rb.address) as ch:
            jobs, farms = jsg.JobServiceStub(ch), fsg.FarmServiceStub(ch)
            # A write while the database is away: UNAVAILABLE with a reason and RetryInfo.
            with pytest.raises(grpc.RpcError) as refused:
                jobs.CreateJob(js.CreateJobRequest(request_id="probe", spec=_spec()), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert _details(refused.value) == ("DATABASE_UNAVAILABLE", 1.0)
            # Reads of the jobs the core holds (live ones: finished jobs left memory once
            # stored, issue 17) are answered from memory; the core changes nothing meanwhile.
            listed = jobs.ListJobs(js.ListJobsRequest(page_size=1000), timeout=10).jobs
            assert {j.name for j in listed} == {f"jobs/{i}" for i in svc.core.jobs}
            for j in listed[:3]:
                assert jobs.GetJob(js.GetJobRequest(name=j.name), timeout=10).state == j.state
            workers = farms.ListWorkers(fs.ListWorkersRequest(parent=farm.name), timeout=10)
            assert len(workers.workers) == 2
            # Health fails once the database has been away for db_outage_unhealthy_s.
            _wait(
                lambda: _health(rb.address) == health_pb2.HealthCheckResponse.NOT_SERVING,
                OUTAGE_S + UNHEALTHY_S,
                "NOT_SERVING",
            )
            down_for = svc.database_down_for()
            assert down_for is not None and down_for >= UNHEALTHY_S
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))

            pg.start()
            started_at = time.monotonic()
            while True:  # a client retrying fast with its request id
                try:
                    jobs.CreateJob(
                        js.CreateJobRequest(request_id="probe", spec=_spec()), timeout=10
                    )
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                    assert time.monotonic() - started_at < 30, "writes did not resume"
                    time.sleep(0.05)
            writable_after = time.monotonic() - started_at
            _wait(
                lambda: _health(rb.address) == health_pb2.HealthCheckResponse.SERVING,
                10,
                "SERVING again",
            )
        print(
            f"\nPostgreSQL down {started_at - stopped_at:.1f} s; writes resumed "
            f"{writable_after:.2f} s after it accepted connections; UNAVAILABLE answers: "
            f"{dict(errors.reasons)}"
        )
        _wait(lambda: sum(len(c.created) for c in clients) >= 30, 30, "load after the outage")
        stop_clients.set()
        for c in clients:
            c.join(40)
            assert not c.is_alive()

        created = {rid: name for c in clients for rid, name in c.created.items()}
        created["probe"] = ""
        engine = sqlalchemy.create_engine(pg.url)

        def all_succeeded() -> bool:
            with engine.connect() as conn:
                states = conn.execute(sqlalchemy.text("SELECT id, state FROM jobs")).all()
            return len(states) == len(created) and {s for _, s in states} == {"SUCCEEDED"}

        _wait(all_succeeded, 60, "every job to succeed")
        for rig in rigs:
            rig.close()
        with engine.connect() as conn:
            q = sqlalchemy.text
            rows = conn.execute(q("SELECT request_id, id FROM jobs")).all()
            attempts = conn.execute(q("SELECT job_id, number, last_sequence FROM attempts")).all()
            logs = conn.execute(q("SELECT job_id, attempt, sequence, data FROM job_logs")).all()
        engine.dispose()
    finally:
        stop_clients.set()
        for rig in rigs:
            rig.close()
        rb.stop()
        if not pg.running():
            pg.start()

    assert errors.unexpected == [], errors.unexpected  # never INTERNAL, UNKNOWN, ...
    assert set(errors.codes) <= {"UNAVAILABLE"}
    assert errors.reasons["DATABASE_UNAVAILABLE"] > 0, "the load met the outage"
    for rig in rigs:  # leases were renewed from memory all along
        assert rig.heartbeat_failures == [], rig.heartbeat_failures
    # Every job exactly once: one row per request id, the one the client was given.
    assert sorted(r.request_id for r in rows) == sorted(created)
    by_request = {r.request_id: f"jobs/{r.id}" for r in rows}
    assert all(by_request[rid] == name for rid, name in created.items() if name)
    # Nothing was requeued by the outage, and every event was applied exactly once.
    assert Counter(a.job_id for a in attempts) == Counter({r.id: 1 for r in rows})
    assert {a.last_sequence for a in attempts} == {4}
    sent = sorted(log for rig in rigs for log in rig.sent_logs)
    stored = sorted((f"jobs/{j}", a, s, d) for j, a, s, d in logs)
    assert stored == sent
    verify = subprocess.run(
        [str(EXE), "admin", "verify-ledger", "--db", pg.url], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


# --- SQLite ----------------------------------------------------------------------------


def _refused_create(address: str, request_id: str) -> grpc.RpcError:
    with authed_channel(address) as ch, pytest.raises(grpc.RpcError) as refused:
        jsg.JobServiceStub(ch).CreateJob(
            js.CreateJobRequest(request_id=request_id, spec=_spec()), timeout=30
        )
    return refused.value


def _create_when_writable(address: str, request_id: str) -> str:
    """Retry CreateJob with one request id until it is taken (bounded); the job's name."""
    deadline = time.monotonic() + 30
    with authed_channel(address) as ch:
        stub = jsg.JobServiceStub(ch)
        while True:
            try:
                return stub.CreateJob(
                    js.CreateJobRequest(request_id=request_id, spec=_spec()), timeout=30
                ).name
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                assert time.monotonic() < deadline, "writes did not resume"
                time.sleep(0.1)


def _jobs_by_request(db: Path) -> Counter[str]:
    with sqlite3.connect(db) as conn:
        return Counter(r for (r,) in conn.execute("SELECT request_id FROM jobs"))


def test_sqlite_locked_by_another_process(tmp_path: Path):
    rb = start_broker(tmp_path / "b", lease_ttl_s=15.0, heartbeat_interval_s=1.0)
    db = tmp_path / "b" / "broker.db"
    agent = None
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        farm = create_farm(rb.address)
        agent = ProtocolAgent(rb.address, farm.enrollment_token, gpus(1))
        agent.register()
        holder.execute("BEGIN IMMEDIATE")  # e.g. a backup script holding the write lock
        # The first write waits for SQLite's busy timeout (5 s), then is refused.
        err = _refused_create(rb.address, "r1")
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert _details(err) == ("DATABASE_LOCKED", 1.0)
        assert "locked by another process" in err.details()
        again = _refused_create(rb.address, "r2")  # now refused at once, before the core
        assert _details(again) == ("DATABASE_LOCKED", 1.0)
        agent.heartbeat()  # leases are renewed from memory
        with authed_channel(rb.address) as ch:
            listed = jsg.JobServiceStub(ch).ListJobs(js.ListJobsRequest(), timeout=10)
        assert [j.state for j in listed.jobs] == [State.PENDING]  # held, shown from memory
        holder.execute("ROLLBACK")
        released = time.monotonic()
        name = _create_when_writable(rb.address, "r1")
        print(f"\nSQLite lock released: writes resumed {time.monotonic() - released:.2f} s later")
        assert listed.jobs[0].name == name
        assert _create_when_writable(rb.address, "r2") != name
        assert _jobs_by_request(db) == Counter({"r1": 1, "r2": 1})
    finally:
        holder.close()
        if agent is not None:
            agent.close()
        rb.stop()


def _make_read_only(path: Path) -> Callable[[], None]:
    """Make a file read-only for this process (root ignores modes: the immutable flag
    then); returns how to undo it. Skips where neither works."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        return lambda: path.chmod(0o644)
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make {path} read-only for root: {done.stderr.strip()}")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_sqlite_read_only_database_file(tmp_path: Path):
    """A broker restarted on a file it may not write (a restore left it root-owned, a
    read-only volume): reads work, writes are UNAVAILABLE DATABASE_READ_ONLY, and the
    broker resumes by itself once the file is writable again."""
    home = tmp_path / "b"
    rb = start_broker(home)
    create_farm(rb.address)
    rb.stop()
    db = home / "broker.db"
    undo = _make_read_only(db)
    writable = False
    try:
        rb = start_broker(home)
        try:
            err = _refused_create(rb.address, "r1")
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert _details(err) == ("DATABASE_READ_ONLY", 5.0)
            assert "read-only" in err.details()
            with authed_channel(rb.address) as ch:
                workers = fsg.FarmServiceStub(ch).ListWorkers(fs.ListWorkersRequest(), timeout=10)
            assert list(workers.workers) == []
            undo()
            writable = True
            fixed = time.monotonic()
            _create_when_writable(rb.address, "r1")
            print(f"\nSQLite file writable: writes resumed {time.monotonic() - fixed:.2f} s later")
            # The metrics' snapshot the first stop left could not be taken on the read-only
            # file; the first write deleted it, so a crash now cannot leave stale totals.
            with sqlite3.connect(db) as conn:
                assert conn.execute("SELECT count(*) FROM metric_snapshots").fetchone() == (0,)
        finally:
            rb.stop()
    finally:
        if not writable:
            undo()
    assert _jobs_by_request(db) == Counter({"r1": 1})
