"""A scripted broker on a real gRPC port (port 0), and an agent run against it.

The fake broker speaks WorkerService, ArtifactService and FarmService, records what
the agent sends and does what each test tells it (fail reports, answer ``stale``,
change the reconcile, refuse connections). ``run_session`` runs one agent against it;
jobs run through the LocalExecutor on a simulated rig, so these tests need no Ray (the
Ray path is covered in tests/ray and tests/e2e). Used by the agent's session tests:
test_agent_protocol.py, test_agent_resilience.py, test_agent_artifacts.py,
test_agent_setup.py, test_agent_inputs_outputs.py, test_agent_disk_full.py,
test_agent_gpu_health.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from rigshift.v1 import artifact_service_pb2 as art
from rigshift.v1 import artifact_service_pb2_grpc as artg
from rigshift.v1 import farm_pb2
from rigshift.v1 import farm_service_pb2_grpc as fsg
from rigshift.v1 import worker_service_pb2 as ws
from rigshift.v1 import worker_service_pb2_grpc as wsg
from worker_agent.agent import Agent
from worker_agent.config import AgentConfig
from worker_agent.executor import LocalExecutor
from worker_agent.gpu import SimulatedBackend

PY = sys.executable


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
        self.health_reports: list[ws.ReportGpuHealthRequest] = []
        self.fail_health_reports = 0
        self.port = 0
        self.session_supported = True  # False: UNIMPLEMENTED, as a broker older than Session
        self.sessions = 0
        self.session_requests: list[ws.SessionRequest] = []
        self.unary_heartbeats = 0

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
        self.unary_heartbeats += 1
        return ws.HeartbeatResponse()

    async def Session(self, request_iterator, context):  # type: ignore[no-untyped-def]
        """Each request is a renewal (failed, delayed as the unary Heartbeat's are); the
        answers go between the instructions, a Reconcile first."""
        if not self.session_supported:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        if not self._check(context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong credential")
        queue: asyncio.Queue[ws.Instruction | grpc.StatusCode | None] = asyncio.Queue()

        async def read() -> None:
            async for request in request_iterator:
                self.session_requests.append(request)
                if not self._check(context):  # each renewal checks the credential
                    queue.put_nowait(grpc.StatusCode.PERMISSION_DENIED)
                    return
                if self.heartbeat_error is not None:
                    queue.put_nowait(self.heartbeat_error)
                    return
                if self.heartbeat_delay_s:
                    await asyncio.sleep(self.heartbeat_delay_s)
                self.heartbeats += 1
                queue.put_nowait(ws.Instruction(lease_renewed=ws.LeaseRenewed()))
            queue.put_nowait(None)

        reader = asyncio.create_task(read())
        self.sessions += 1
        self.streams.append(queue)  # type: ignore[arg-type]
        try:
            yield ws.Instruction(reconcile=ws.Reconcile(assignments=self.reconcile))
            while (item := await queue.get()) is not None:
                if isinstance(item, grpc.StatusCode):
                    await context.abort(item, "scripted failure")
                yield item
        finally:
            reader.cancel()  # and wait for it: see broker.api.workers._Session.serve
            with contextlib.suppress(BaseException):
                await asyncio.wait([reader])

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

    async def ReportGpuHealth(self, request, context):  # type: ignore[no-untyped-def]
        if not self._check(context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong credential")
        if self.fail_health_reports:
            self.fail_health_reports -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted failure")
        self.health_reports.append(request)
        return ws.ReportGpuHealthResponse()

    def health(self, index: int) -> ws.GpuHealth | None:
        """GPU ``index`` in the latest health report taken (None: not in it, or none yet)."""
        if not self.health_reports:
            return None
        return next((g for g in self.health_reports[-1].gpus if g.index == index), None)

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
        # Unary unless a test asks for Session: with the scripted server in the agent's own
        # event loop, an agent stopped right after opening a session sometimes hangs
        # asyncio.run's teardown on the server's leftover task (docs/scale.md §2).
        "session_protocol": False,
    }
    base.update(kw)
    return AgentConfig(**base)  # type: ignore[arg-type]


def run_session(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    body,
    *,
    spec: str = "RTX3090x4",
    broker_ttl_s: int = 3,
    backend: SimulatedBackend | None = None,
    session: bool = True,
    **cfg: object,
) -> FakeBroker:
    """Start a fake broker (lease TTL ``broker_ttl_s``) and an agent, run ``body(fake, agent)``,
    stop both. ``fake.stop()`` / ``fake.serve()`` take the broker away and bring it back.
    ``backend``: the simulated rig (e.g. with faults), else ``spec``'s; ``session=False``:
    the broker answers Session with UNIMPLEMENTED (a broker older than issue 17)."""

    async def main() -> FakeBroker:
        fake = FakeBroker()
        fake.lease_ttl_seconds = broker_ttl_s
        fake.session_supported = session
        await fake.serve()
        try:
            agent = Agent(
                config(tmp_path, f"127.0.0.1:{fake.port}", **cfg),
                backend=backend or SimulatedBackend(spec, seed="t"),
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
