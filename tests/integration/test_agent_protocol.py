"""The agent's session logic against a scripted broker (a real gRPC server on port 0).

The fake broker speaks WorkerService and ArtifactService, records what the agent
sends and does what each test tells it (fail reports, answer ``stale``, change
the reconcile). Jobs run through the LocalExecutor on a simulated rig, so these
tests need no Ray; the Ray path is covered in test_agent_executor.py and tests/e2e.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from harness.agent_fixtures import make_assignment
from rigshift.v1 import artifact_service_pb2 as art
from rigshift.v1 import artifact_service_pb2_grpc as artg
from rigshift.v1 import farm_pb2
from rigshift.v1 import farm_service_pb2_grpc as fsg
from rigshift.v1 import worker_service_pb2 as ws
from rigshift.v1 import worker_service_pb2_grpc as wsg
from worker_agent.agent import Agent, AgentError
from worker_agent.config import AgentConfig
from worker_agent.executor import LocalExecutor
from worker_agent.gpu import SimulatedBackend
from worker_agent.process import alive as _alive

PY = sys.executable
AUTH = ("authorization", "Bearer cred-1")


class FakeBroker(wsg.WorkerServiceServicer, artg.ArtifactServiceServicer, fsg.FarmServiceServicer):
    """Scripted broker: records every call, applies each (job, attempt, sequence) once."""

    def __init__(self) -> None:
        self.registrations: list[ws.RegisterWorkerRequest] = []
        self.heartbeats = 0
        self.heartbeat_error: grpc.StatusCode | None = None
        self.heartbeat_delay_s = 0.0  # > the agent's deadline: DEADLINE_EXCEEDED, a black hole
        self.lease_ttl_seconds = 3
        self.report_calls: list[list[ws.JobEvent]] = []
        self.fail_reports = 0
        self.stale: list[ws.Cancellation] = []
        self.reconcile: list[ws.Assignment] = []
        self.applied: dict[tuple[str, int], list[ws.JobEvent]] = {}
        self.streams: list[asyncio.Queue[ws.Instruction | None]] = []
        self.artifacts: dict[str, bytes] = {}
        self.downloads = 0
        self.credential = "cred-1"
        self.server: grpc.aio.Server | None = None
        self.drains: list[str] = []
        self.fail_drains = 0
        self.port = 0

    def _check(self, context: grpc.aio.ServicerContext) -> bool:
        return ("authorization", f"Bearer {self.credential}") in tuple(
            context.invocation_metadata() or ()
        )

    async def RegisterWorker(self, request, context):  # type: ignore[no-untyped-def]
        if request.enrollment_token != "good-token":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "enrollment token not recognised")
        self.registrations.append(request)
        return ws.RegisterWorkerResponse(
            worker=request.worker or "workers/w1",
            credential=self.credential,
            lease_ttl_seconds=self.lease_ttl_seconds,
            heartbeat_interval_seconds=1,
        )

    async def Heartbeat(self, request, context):  # type: ignore[no-untyped-def]
        if not self._check(context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong credential")
        if self.heartbeat_error is not None:
            await context.abort(self.heartbeat_error, "scripted failure")
        if self.heartbeat_delay_s:
            await asyncio.sleep(self.heartbeat_delay_s)
        self.heartbeats += 1
        return ws.HeartbeatResponse()

    async def StreamInstructions(self, request, context):  # type: ignore[no-untyped-def]
        if not self._check(context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong credential")
        queue: asyncio.Queue[ws.Instruction | None] = asyncio.Queue()
        self.streams.append(queue)
        yield ws.Instruction(reconcile=ws.Reconcile(assignments=self.reconcile))
        while (item := await queue.get()) is not None:
            yield item

    async def ReportJobEvents(self, request, context):  # type: ignore[no-untyped-def]
        if not self._check(context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong credential")
        self.report_calls.append(list(request.events))
        if self.fail_reports:
            self.fail_reports -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted failure")
        applied = 0
        for e in request.events:
            got = self.applied.setdefault((e.job, e.attempt), [])
            if e.sequence > len(got):
                assert e.sequence == len(got) + 1, "sequence numbers must not skip"
                got.append(e)
                applied += 1
        stale, self.stale = self.stale, []
        return ws.ReportJobEventsResponse(applied=applied, stale=stale)

    async def DrainWorker(self, request, context):  # type: ignore[no-untyped-def]
        if not self._check(context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong credential")
        if self.fail_drains:
            self.fail_drains -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted failure")
        self.drains.append(request.name)
        return farm_pb2.Worker(name=request.name, state=farm_pb2.Worker.DRAINING)

    async def DownloadArtifact(self, request, context):  # type: ignore[no-untyped-def]
        if not self._check(context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong credential")
        self.downloads += 1
        data = self.artifacts.get(request.sha256)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such artifact")
        for i in range(0, len(data), 1000):
            yield art.ArtifactChunk(data=data[i : i + 1000])

    async def UploadArtifact(self, request_iterator, context):  # type: ignore[no-untyped-def]
        if not self._check(context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong credential")
        sha, size, data = "", 0, b""
        async for chunk in request_iterator:
            if not sha:
                sha, size = chunk.sha256, chunk.size_bytes
            data += chunk.data
        assert hashlib.sha256(data).hexdigest() == sha and len(data) == size
        self.artifacts[sha] = data
        return art.Artifact(sha256=sha, size_bytes=size)

    # --- test helpers ---

    async def serve(self) -> None:
        """Listen (on the same port again after :meth:`stop`)."""
        self.server = grpc.aio.server()
        wsg.add_WorkerServiceServicer_to_server(self, self.server)
        artg.add_ArtifactServiceServicer_to_server(self, self.server)
        fsg.add_FarmServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        """Close the port: the agent's connections are refused, as when the broker is down."""
        if self.server is not None:
            await self.server.stop(0)
            self.server = None

    def push(self, **kind: object) -> None:
        self.streams[-1].put_nowait(ws.Instruction(**kind))

    def kinds(self, job: str, attempt: int = 1) -> list[str]:
        return [str(e.WhichOneof("kind")) for e in self.applied.get((job, attempt), [])]

    def finished(self, job: str, attempt: int = 1) -> ws.Finished | None:
        for e in self.applied.get((job, attempt), []):
            if e.WhichOneof("kind") == "finished":
                return e.finished
        return None

    def output(self, job: str, attempt: int = 1) -> str:
        return "".join(
            e.log.data for e in self.applied.get((job, attempt), []) if e.HasField("log")
        )


async def until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


def config(tmp_path: Path, address: str, **kw: object) -> AgentConfig:
    base: dict[str, object] = {
        "broker_address": address,
        "enrollment_token": "good-token",
        "state_dir": tmp_path / "agent",
        "hostname": "rig-test",
        "heartbeat_interval_s": 0.3,
        "lease_ttl_s": 3.0,
        "lease_grace_s": 1.0,
        "report_flush_s": 0.05,
        "progress_interval_s": 0.3,
        "energy_sample_interval_s": 0.1,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "drain_grace_s": 3.0,
        "cancel_grace_s": 1.0,
    }
    base.update(kw)
    return AgentConfig(**base)  # type: ignore[arg-type]


def run_session(  # type: ignore[no-untyped-def]
    tmp_path: Path, body, *, spec: str = "RTX3090x4", broker_ttl_s: int = 3, **cfg: object
) -> FakeBroker:
    """Start a fake broker (lease TTL ``broker_ttl_s``) and an agent, run ``body(fake, agent)``,
    stop both. ``fake.stop()`` / ``fake.serve()`` take the broker away and bring it back."""

    async def main() -> FakeBroker:
        fake = FakeBroker()
        fake.lease_ttl_seconds = broker_ttl_s
        await fake.serve()
        try:
            agent = Agent(
                config(tmp_path, f"127.0.0.1:{fake.port}", **cfg),
                backend=SimulatedBackend(spec, seed="t"),
                executor=LocalExecutor(flush_s=0.05, kill_grace_s=1.0),
            )
            async with agent:
                await until(lambda: fake.streams, what="the instruction stream")
                await body(fake, agent)
        finally:
            await fake.stop()
        return fake

    return asyncio.run(main())


def script(*lines: str) -> list[str]:
    return [PY, "-c", "\n".join(lines)]


def test_registers_heartbeats_and_keeps_its_identity(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        await until(lambda: fake.heartbeats >= 2, what="heartbeats")
        assert agent.worker == "workers/w1"
        # broker says 1 s, config 0.3 s: the stricter wins
        assert agent.heartbeat_interval_s == 0.3

    fake = run_session(tmp_path, body)
    reg = fake.registrations[0]
    assert (reg.hostname, reg.worker, len(reg.gpus)) == ("rig-test", "", 4)
    assert reg.gpus[0].model == "RTX 3090" and reg.gpus[0].price_micros_per_gpu_hour == 250_000
    saved = json.loads((tmp_path / "agent" / "identity.json").read_text())
    assert saved["worker"] == "workers/w1" and saved["credential"] == "cred-1"
    assert (tmp_path / "agent" / "identity.json").stat().st_mode & 0o777 == 0o600

    async def again(fake: FakeBroker, agent: Agent) -> None:
        assert agent.worker == "workers/w1"

    fake = run_session(tmp_path, again, price_micros_per_gpu_hour=123)
    assert fake.registrations[0].worker == "workers/w1"  # the same worker after a restart
    assert fake.registrations[0].gpus[0].price_micros_per_gpu_hour == 123


def test_a_refused_enrollment_token_stops_the_agent(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        raise AssertionError("must not get here")

    with pytest.raises(AgentError, match="enrollment token not recognised"):
        run_session(tmp_path, body, enrollment_token="bad")


def test_job_runs_with_its_environment_and_sequenced_events(tmp_path: Path) -> None:
    cmd = script(
        "import os, time",
        "for k in ('RIGSHIFT_JOB_ID','RIGSHIFT_ATTEMPT','CUDA_VISIBLE_DEVICES','FOO'):",
        "    print(k, os.environ.get(k), flush=True)",
        "print('checkpoint dir exists', os.path.isdir(os.environ['RIGSHIFT_CHECKPOINT_DIR']))",
        "print('token hidden', 'RAY_AUTH_TOKEN_PATH' not in os.environ)",
        "time.sleep(1.0)",
    )

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=make_assignment("jobs/j1", gpus=[1, 3], command=cmd, env={"FOO": "x"}))
        await until(lambda: fake.finished("jobs/j1"), what="finished")

    os.environ["RAY_AUTH_TOKEN_PATH"] = "/secret"
    try:
        fake = run_session(tmp_path, body)
    finally:
        del os.environ["RAY_AUTH_TOKEN_PATH"]
    out = fake.output("jobs/j1")
    assert "RIGSHIFT_JOB_ID j1\nRIGSHIFT_ATTEMPT 1\nCUDA_VISIBLE_DEVICES 1,3\nFOO x\n" in out
    assert "checkpoint dir exists True" in out and "token hidden True" in out
    kinds = fake.kinds("jobs/j1")
    assert kinds[:2] == ["preparing", "started"]
    assert kinds[-1] == "finished" and "progress" in kinds
    seqs = [e.sequence for e in fake.applied[("jobs/j1", 1)]]
    assert seqs == list(range(1, len(seqs) + 1))
    finished = fake.finished("jobs/j1")
    assert finished is not None and finished.exit_code == 0
    # two RTX 3090s training for about 1 s: 2 x ~300 W x ~1 s
    assert 300 < finished.energy_joules < 1500
    progress = [
        e.progress.energy_joules for e in fake.applied[("jobs/j1", 1)] if e.HasField("progress")
    ]
    assert progress == sorted(progress) and progress[-1] <= finished.energy_joules


def test_failed_reports_are_retried_with_the_same_numbers(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.fail_reports = 3
        fake.push(assignment=make_assignment("jobs/r", command=script("print('a'); print('b')")))
        await until(lambda: fake.finished("jobs/r"), what="finished")

    fake = run_session(tmp_path, body)
    assert fake.report_calls[0] == fake.report_calls[1] == fake.report_calls[2]
    assert fake.report_calls[3][: len(fake.report_calls[0])] == fake.report_calls[0]
    assert fake.output("jobs/r") == "a\nb\n"
    assert fake.finished("jobs/r").exit_code == 0  # type: ignore[union-attr]


def test_reconcile_starts_missing_and_stops_unlisted(tmp_path: Path) -> None:
    long = script("import time; print('up', flush=True); time.sleep(600)")

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=make_assignment("jobs/old", command=long))
        await until(lambda: "started" in fake.kinds("jobs/old"), what="old started")
        # The broker restarts: the new stream's reconcile lists only jobs/new.
        fake.reconcile = [make_assignment("jobs/new", gpus=[2], command=script("print('new')"))]
        fake.streams[-1].put_nowait(None)
        await until(lambda: fake.finished("jobs/new") and fake.finished("jobs/old"), what="both")

    fake = run_session(tmp_path, body)
    assert len(fake.streams) >= 2  # reconnected
    assert fake.output("jobs/new") == "new\n"
    old = fake.finished("jobs/old")
    assert old is not None and old.exit_code == -15 and "reconcile" in old.message


def test_a_reconcile_does_not_rerun_a_finished_attempt(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/once", command=script("print('ran')"))
        fake.push(assignment=a)
        await until(lambda: fake.finished("jobs/once"), what="finished")
        fake.reconcile = [a]  # a broker that has not caught up yet
        fake.streams[-1].put_nowait(None)
        await until(lambda: len(fake.streams) >= 2, what="reconnect")
        await asyncio.sleep(0.5)

    fake = run_session(tmp_path, body)
    assert fake.output("jobs/once") == "ran\n"
    assert fake.kinds("jobs/once").count("started") == 1


def test_cancellation_kills_the_process_tree_within_5_s(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    cmd = script(
        "import os, signal, time",
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)",  # stubborn: needs SIGKILL
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))",
        "time.sleep(600)",
    )
    took: list[float] = []

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=make_assignment("jobs/c", command=cmd))
        await until(lambda: pid_file.exists() and pid_file.read_text(), what="pid")
        t0 = time.monotonic()
        fake.push(cancellation=ws.Cancellation(job="jobs/c", attempt=1, reason="by client"))
        await until(lambda: not _alive(int(pid_file.read_text())), timeout=5.0, what="kill")
        took.append(time.monotonic() - t0)
        await until(lambda: fake.finished("jobs/c"), what="finished")

    fake = run_session(tmp_path, body)
    assert took[0] < 5.0
    f = fake.finished("jobs/c")
    assert f is not None and f.exit_code == -9 and f.message == "cancelled: by client"


def test_stale_attempts_are_stopped(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.stale = [ws.Cancellation(job="jobs/s", attempt=1, reason="attempt LOST")]
        fake.push(
            assignment=make_assignment("jobs/s", command=script("import time; time.sleep(600)"))
        )
        await until(lambda: fake.finished("jobs/s"), what="stopped")

    fake = run_session(tmp_path, body)
    assert fake.finished("jobs/s").message == "stale: attempt LOST"  # type: ignore[union-attr]


def test_credential_refused_registers_again_as_the_same_worker(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.credential = "cred-2"  # e.g. the broker lost its credential table
        await until(lambda: len(fake.registrations) >= 2, what="re-registration")
        fake.credential = "cred-1"  # the fake hands out cred-1 on registration
        before = fake.heartbeats
        await until(lambda: fake.heartbeats > before, what="heartbeats again")

    fake = run_session(tmp_path, body)
    assert fake.registrations[1].worker == "workers/w1"


def test_lost_lease_stops_jobs_without_a_final_report(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/l", command=script("import time; time.sleep(600)"))
        fake.reconcile = [a]  # the broker still lists it until the lease expires
        fake.push(assignment=a)
        await until(lambda: "started" in fake.kinds("jobs/l"), what="started")
        fake.heartbeat_error = grpc.StatusCode.UNAVAILABLE
        # stopped before the TTL of 3 s (less the kill grace of 1 s + 0.5 s) is over
        await until(lambda: not agent.runner.runs, timeout=8.0, what="stopped")  # type: ignore[union-attr]
        fake.reconcile = []  # the broker requeued it
        fake.heartbeat_error = None

    fake = run_session(tmp_path, body)
    assert fake.finished("jobs/l") is None  # the broker requeues it; no FAILED report


def test_a_black_holed_broker_does_not_make_the_agent_drain(tmp_path: Path) -> None:
    """Issue 12: heartbeats time out while the instruction stream hangs without data (a
    half-open connection). The heartbeat loop resets the stream; that must only make the
    stream reconnect. Before the fix the reset ended the stream task as cancelled, and
    Agent.run read "a loop ended" and drained the rig."""
    cmd = script("import time; time.sleep(4); print('done')")

    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/bh", command=cmd)
        fake.reconcile = [a]  # what a reconnected stream hears: it still runs here
        fake.push(assignment=a)
        await until(lambda: "started" in fake.kinds("jobs/bh"), what="started")
        streams = len(fake.streams)
        fake.heartbeat_delay_s = 5.0  # the agent's deadline is 1 s: DEADLINE_EXCEEDED
        await asyncio.sleep(2.5)
        fake.heartbeat_delay_s = 0.0  # the link heals
        before = fake.heartbeats
        await until(lambda: fake.heartbeats > before + 2, what="heartbeats again")
        assert agent.state == "online"  # not "draining"
        assert not agent._stopping.is_set()
        await until(lambda: len(fake.streams) > streams, what="a new instruction stream")
        await until(lambda: fake.finished("jobs/bh"), what="the job to finish")
        assert agent.state == "online"

    fake = run_session(tmp_path, body, broker_ttl_s=30, lease_ttl_s=30.0)
    finished = fake.finished("jobs/bh")
    assert finished is not None and finished.exit_code == 0  # kept running through the cut
    assert fake.output("jobs/bh") == "done\n"


def test_jobs_outlive_a_broker_that_refuses_connections_past_the_ttl(tmp_path: Path) -> None:
    """A port that refuses connections means no broker runs: nobody can requeue the jobs,
    and a broker that starts gives live workers a fresh lease. So the agent keeps its jobs
    past the TTL (for lease_grace_s) and adopts them when the broker is back."""
    cmd = script("import time; time.sleep(7); print('done')")

    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/rs", command=cmd)
        fake.reconcile = [a]
        fake.push(assignment=a)
        await until(lambda: "started" in fake.kinds("jobs/rs"), what="started")
        await fake.stop()
        await asyncio.sleep(3.5)  # past the TTL of 3 s
        assert agent.lease.broker_down
        run = agent.runner.runs.get(("jobs/rs", 1))  # type: ignore[union-attr]
        assert run is not None and not run.stop_reason
        await fake.serve()  # a broker restart: same port, same state
        await until(lambda: fake.finished("jobs/rs"), timeout=15.0, what="finished")

    fake = run_session(tmp_path, body, lease_grace_s=4.0)
    assert fake.finished("jobs/rs").exit_code == 0  # type: ignore[union-attr]
    assert fake.output("jobs/rs") == "done\n"


def test_a_frozen_agent_stops_its_jobs_before_it_reports_anything(tmp_path: Path) -> None:
    """The agent's process stops for longer than the TTL (SIGSTOP, a kernel stall) while its
    job's process goes on; meanwhile the broker requeued the job. Once the agent runs
    again it stops the job at once, without a report, before its first heartbeat."""
    pid_file = tmp_path / "pid"
    cmd = script(
        "import os, time",
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))",
        "time.sleep(600)",
    )

    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/fz", command=cmd)
        fake.reconcile = [a]
        fake.push(assignment=a)
        await until(lambda: pid_file.exists() and pid_file.read_text(), what="pid")
        fake.reconcile = []  # the broker expires the lease meanwhile
        time.sleep(4.0)  # blocks the agent's event loop (and the fake's): frozen past the TTL
        beats = fake.heartbeats
        await until(lambda: not agent.runner.runs, timeout=8.0, what="stopped")  # type: ignore[union-attr]
        assert fake.heartbeats <= beats + 1  # stopped on the first look at the lease
        assert not _alive(int(pid_file.read_text()))

    fake = run_session(tmp_path, body)
    assert "started" in fake.kinds("jobs/fz")
    assert fake.finished("jobs/fz") is None  # never reported: the broker requeued it


class _SteppedTime:
    """The ``time`` module with ``time()`` moved by ``offset_s`` (a wall-clock step).

    Patched into the agent's modules only: grpc.aio turns a call's timeout into a
    wall-clock deadline that its C core converts back with its own clock, so stepping
    Python's ``time.time`` alone would expire every call at once, which a real step
    (moving both clocks) does not."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def time(self) -> float:
        return _REAL_TIME() + self.offset_s


_REAL_TIME = time.time


def test_a_wall_clock_step_neither_expires_nor_extends_the_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker_agent.agent
    import worker_agent.attempts

    clock = _SteppedTime()
    for module in (worker_agent.agent, worker_agent.attempts):
        monkeypatch.setattr(module, "time", clock)
    took: list[float] = []

    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/ck", command=script("import time; time.sleep(600)"))
        fake.reconcile = [a]
        fake.push(assignment=a)
        await until(lambda: "started" in fake.kinds("jobs/ck"), what="started")
        regs = len(fake.registrations)
        for offset in (3600.0, -3600.0):
            clock.offset_s = offset
            beats = fake.heartbeats
            await until(lambda b=beats: fake.heartbeats >= b + 3, what="heartbeats")
            left = agent.lease.expires_at - time.monotonic()
            assert 0 < left <= 3.0  # the broker's TTL: neither expired nor extended
            assert ("jobs/ck", 1) in agent.runner.runs  # type: ignore[union-attr]
        assert len(fake.registrations) == regs
        # With the clock an hour back, the lease still runs out on time when the broker is
        # silent: TTL 3 s less the stop lead (kill grace 1 s + 0.5 s) after the last answer.
        fake.heartbeat_error = grpc.StatusCode.UNAVAILABLE
        renewed = agent.lease.renewed_at
        await until(lambda: not agent.runner.runs, timeout=10.0, what="stopped")  # type: ignore[union-attr]
        took.append(time.monotonic() - renewed)
        fake.reconcile = []
        fake.heartbeat_error = None

    fake = run_session(tmp_path, body)
    print(f"jobs stopped {took[0]:.2f} s after the last answered heartbeat (due at 1.5 s)")
    assert took[0] >= 1.5  # not earlier than due (later only on a slow machine)
    assert fake.finished("jobs/ck") is None
    events = fake.applied[("jobs/ck", 1)]
    assert events[-1].time.seconds < _REAL_TIME() - 1800  # reports carry the stepped wall clock


def test_a_loop_that_ends_is_restarted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    original = Agent._meter_loop

    async def flaky(self: Agent) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("a bug in the meter")
        await original(self)

    monkeypatch.setattr(Agent, "_meter_loop", flaky)

    async def body(fake: FakeBroker, agent: Agent) -> None:
        await until(lambda: len(calls) >= 2, what="the meter loop restarted")
        assert agent.state == "online"

    run_session(tmp_path, body)


def test_a_loop_that_keeps_failing_stops_the_agent_with_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    import worker_agent.agent
    from worker_agent.supervise import supervise

    async def broken(self: Agent) -> None:
        raise RuntimeError("a bug in the miners' loop")

    monkeypatch.setattr(Agent, "_mining_loop", broken)
    fast = functools.partial(supervise, restart_min_s=0.01, restart_max_s=0.02)
    monkeypatch.setattr(worker_agent.agent, "supervise", fast)
    states: list[str] = []

    async def body(fake: FakeBroker, agent: Agent) -> None:
        assert agent._run_task is not None
        await until(agent._run_task.done, what="the agent to stop")
        states.append(agent.state)

    with pytest.raises(AgentError, match="agent loop mining keeps ending"):
        run_session(tmp_path, body)
    assert states == ["stopped"]  # not drained: the process exits with an error


def test_an_unhealthy_rig_has_the_broker_drain_it_and_keeps_running(tmp_path: Path) -> None:
    """AttemptRunner.on_unhealthy (a full state directory) asks the broker to place
    nothing more on the rig, until it takes the request; the agent itself goes on."""
    cmd = script("import time; time.sleep(1.5); print('done')")

    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/u", command=cmd)
        fake.reconcile = [a]
        fake.push(assignment=a)
        await until(lambda: "started" in fake.kinds("jobs/u"), what="started")
        fake.fail_drains = 2  # the broker does not take the first two requests
        assert agent.runner is not None and agent.runner.on_unhealthy is not None
        agent.runner.on_unhealthy("the rig's disk is full: ENOSPC")
        await until(lambda: fake.drains, what="DrainWorker")
        await until(lambda: fake.finished("jobs/u"), what="the running job to finish")
        assert agent.state == "online"
        assert fake.drains == ["workers/w1"]  # once taken, not asked again

    fake = run_session(tmp_path, body)
    assert fake.finished("jobs/u").exit_code == 0  # type: ignore[union-attr]


def test_drain_lets_running_jobs_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(
            assignment=make_assignment(
                "jobs/d", command=script("import time; time.sleep(1); print('done')")
            )
        )
        await until(lambda: "started" in fake.kinds("jobs/d"), what="started")
        agent.request_shutdown()
        await until(lambda: agent.state == "draining", what="draining")
        fake.push(assignment=make_assignment("jobs/late", gpus=[1]))
        await agent.shutdown()
        agent.request_shutdown()  # twice is fine
        await agent.shutdown()
        assert agent.state == "stopped"

    fake = run_session(tmp_path, body)
    assert fake.finished("jobs/d").exit_code == 0  # type: ignore[union-attr]
    assert fake.output("jobs/d") == "done\n"
    assert fake.kinds("jobs/late") == []


def test_drain_hands_back_what_outlives_the_grace(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    cmd = script(
        "import os, time",
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))",
        "time.sleep(600)",
    )

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=make_assignment("jobs/h", command=cmd))
        await until(lambda: pid_file.exists() and pid_file.read_text(), what="pid")
        t0 = time.monotonic()
        await agent.shutdown()
        assert 0.4 < time.monotonic() - t0 < 5.0
        assert not _alive(int(pid_file.read_text()))

    fake = run_session(tmp_path, body, drain_grace_s=0.5)
    assert "started" in fake.kinds("jobs/h")
    assert "finished" not in fake.kinds("jobs/h")  # handed back: the broker requeues it


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_working_dir_is_fetched_verified_and_used(tmp_path: Path) -> None:
    good = _tar_gz({"train.py": b"print(open('data.txt').read())", "data.txt": b"from the archive"})
    sha = hashlib.sha256(good).hexdigest()
    bad_sha = hashlib.sha256(b"something else").hexdigest()

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.artifacts[sha] = good
        fake.artifacts[bad_sha] = good  # the bytes do not match the digest
        fake.push(
            assignment=make_assignment("jobs/w", command=[PY, "train.py"], working_dir_sha256=sha)
        )
        fake.push(
            assignment=make_assignment(
                "jobs/x", gpus=[1], command=[PY, "train.py"], working_dir_sha256=bad_sha
            )
        )
        fake.push(assignment=make_assignment("jobs/y", gpus=[2], working_dir_sha256="ab" * 32))
        await until(lambda: all(fake.finished(j) for j in ("jobs/w", "jobs/x", "jobs/y")))

    fake = run_session(tmp_path, body)
    assert fake.output("jobs/w") == "from the archive\n"
    x = fake.finished("jobs/x")
    assert x is not None and x.exit_code == 127 and "digest mismatch" in x.message
    assert fake.kinds("jobs/x") == ["preparing", "finished"]
    y = fake.finished("jobs/y")
    assert y is not None and y.exit_code == 127 and "NOT_FOUND" in y.message
    assert not list((tmp_path / "agent" / "attempts").iterdir())  # cleaned up


def test_attempts_sharing_an_archive_download_it_once(tmp_path: Path) -> None:
    archive = _tar_gz({"train.py": b"print('shared')"})
    sha = hashlib.sha256(archive).hexdigest()
    names = [f"jobs/s{i}" for i in range(4)]

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.artifacts[sha] = archive
        for i, name in enumerate(names):
            a = make_assignment(name, gpus=[i], command=[PY, "train.py"], working_dir_sha256=sha)
            fake.push(assignment=a)
        await until(lambda: all(fake.finished(n) for n in names))

    fake = run_session(tmp_path, body)
    assert [fake.output(n) for n in names] == ["shared\n"] * 4
    assert fake.downloads == 1


def test_checkpoints_are_uploaded_when_they_change_and_restored_elsewhere(tmp_path: Path) -> None:
    writer = script(
        "import os, time",
        "d = os.environ['RIGSHIFT_CHECKPOINT_DIR']",
        "for epoch in (1, 2):",
        "    open(os.path.join(d, 'tmp'), 'w').write(f'epoch {epoch}')",
        "    os.replace(os.path.join(d, 'tmp'), os.path.join(d, 'ckpt.txt'))",
        "    time.sleep(0.8)",
    )
    reader = script(
        "import os; print(open(os.environ['RIGSHIFT_CHECKPOINT_DIR'] + '/ckpt.txt').read())"
    )

    async def body(fake: FakeBroker, agent: Agent) -> None:
        fake.push(assignment=make_assignment("jobs/k", command=writer))
        await until(lambda: fake.finished("jobs/k"), what="the writer")
        events = [e for e in fake.applied[("jobs/k", 1)] if e.HasField("checkpoint")]
        assert len(events) == 2
        last = events[-1].checkpoint
        assert last.size_bytes == len(fake.artifacts[last.sha256])
        # The job succeeded, so its local checkpoint directory is gone: like another rig.
        assert not (tmp_path / "agent" / "checkpoints" / "k").exists()
        again = make_assignment("jobs/k", attempt=2, command=reader)
        again.checkpoint_sha256 = last.sha256
        fake.push(assignment=again)
        await until(lambda: fake.finished("jobs/k", 2), what="the reader")

    fake = run_session(
        tmp_path, body, checkpoint_scan_interval_s=0.2, checkpoint_min_interval_s=0.2
    )
    kinds = fake.kinds("jobs/k")
    assert kinds.index("checkpoint") > kinds.index("started")
    assert kinds[-1] == "finished"
    assert fake.output("jobs/k", 2) == "epoch 2\n"


def test_a_checkpoint_that_cannot_be_restored_does_not_fail_the_job(tmp_path: Path) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/r2", attempt=2, command=script("print('fresh start')"))
        a.checkpoint_sha256 = "cd" * 32  # the broker no longer has it
        fake.push(assignment=a)
        await until(lambda: fake.finished("jobs/r2", 2), what="finished")

    fake = run_session(tmp_path, body)
    assert fake.finished("jobs/r2", 2).exit_code == 0  # type: ignore[union-attr]
    out = fake.output("jobs/r2", 2)
    assert out.startswith("[rigshift-agent: checkpoint cdcdcdcdcdcd not restored")
    assert out.endswith("fresh start\n")
