"""A load-generator process: K/P simulated agents in one asyncio loop, driven over a pipe.

Every agent calls RegisterWorker, holds StreamInstructions open, heartbeats at the
interval the broker answered (random phase, +-5% jitter), and on each Assignment
reports ``started`` and, ``job_seconds`` later, ``finished``. The parent sends
``("window", start, end)``, ``("query",)`` and ``("stop",)``; the process answers
``("ready", registered, ready)``, ``("assigned", [(job, wall time), ...])`` and at the
end ``("result", LoadGenResult as a dict)``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from rigshift.catalogue import CATALOGUE
from rigshift.scoring import reference
from rigshift.v1 import farm_pb2
from rigshift.v1 import worker_service_pb2 as ws
from rigshift.v1 import worker_service_pb2_grpc as wsg
from worker_agent.broker_calls import ask_broker_to_drain

__all__ = ["GPU_MODELS", "LoadGen", "LoadGenConfig", "LoadGenResult", "SimAgent", "loadgen_main"]

FLEET_MODELS = ("RTX 3060", "RTX 3070", "RTX 3080", "RTX 3090", "RX 6800 XT", "A4000")
GPU_MODELS = tuple(m for m in CATALOGUE if m.name in FLEET_MODELS)  # the rigs' models, in turn
REPORT_TIMEOUT_S = 30.0


@dataclass
class LoadGenConfig:
    """What one load-generator process needs."""

    index: int
    address: str
    enrollment_token: str
    agents: int
    first_agent: int
    gpus_per_agent: int
    job_seconds: float
    channels: int
    register_concurrency: int
    register_rate_per_s: float  # this process's share; 0: as fast as the broker answers
    register_timeout_s: float
    seed: int
    protocol: str = "session"  # "session": WorkerService.Session; "unary": Heartbeat calls
    # At "stop", ask the broker to drain every agent first (FarmService.DrainWorker), as a
    # real agent does on SIGTERM, so no work is placed on rigs that are going away.
    drain_on_stop: bool = False


@dataclass
class LoadGenResult:
    """What one load-generator process measured."""

    index: int
    registered: int = 0
    ready: int = 0
    register_s: float = 0.0
    heartbeat_interval_s: float = 0.0
    heartbeats_ok: int = 0  # answered OK inside the window
    heartbeat_latencies_ms: list[float] = field(default_factory=list)
    heartbeats_total: int = 0
    reports_ok: int = 0
    jobs_started: int = 0
    jobs_finished: int = 0
    cancellations: int = 0
    stream_reconnects: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # "Method:CODE" -> count, in window
    errors_outside_window: dict[str, int] = field(default_factory=dict)  # registration, drain
    timeline: dict[int, list[int]] = field(default_factory=dict)  # unix second -> [ok, failed]
    error_examples: dict[str, str] = field(default_factory=dict)  # "Method:CODE" -> details


class SimAgent:
    """One simulated rig: register, stream, heartbeat, run assignments (by sleeping)."""

    def __init__(self, gen: LoadGen, number: int, stub: wsg.WorkerServiceStub) -> None:
        self.gen = gen
        self.number = number
        self.stub = stub
        self.worker = ""
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.interval_s = 3.0
        self.ready = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.call: Any = None
        self.requests: asyncio.Queue[ws.SessionRequest | None] = asyncio.Queue()
        self.sent: collections.deque[float] = collections.deque()  # renewals not yet answered

    def gpus(self) -> list[ws.GpuInfo]:
        model = GPU_MODELS[self.number % len(GPU_MODELS)]
        return [
            ws.GpuInfo(
                index=i,
                uuid=f"SIM-{self.number}-{i}",
                model=model.name,
                vram_mb=model.vram_mb,
                power_limit_watts=model.board_power_w,
                price_micros_per_gpu_hour=model.default_price_micros_per_gpu_hour,
                pcie_link_width=1,
                measurement=_healthy(model.name, model.vram_mb),
            )
            for i in range(self.gen.cfg.gpus_per_agent)
        ]

    async def register(self) -> bool:
        req = ws.RegisterWorkerRequest(
            enrollment_token=self.gen.cfg.enrollment_token,
            hostname=f"bench-rig-{self.number}",
            agent_version="fleet-bench",
            gpus=self.gpus(),
        )
        try:
            resp = await self.stub.RegisterWorker(req, timeout=self.gen.cfg.register_timeout_s)
        except grpc.aio.AioRpcError as err:
            self.gen.error("RegisterWorker", err)
            return False
        self.worker = resp.worker
        self.metadata = (("authorization", f"Bearer {resp.credential}"),)
        self.interval_s = float(resp.heartbeat_interval_seconds or 3)
        if self.gen.cfg.protocol == "session":
            self.tasks.append(asyncio.create_task(self._session_loop()))
        else:
            self.tasks.append(asyncio.create_task(self._stream_loop()))
        return True

    async def _requests(self) -> Any:
        while (request := await self.requests.get()) is not None:
            yield request

    def _instruction(self, instruction: ws.Instruction) -> None:
        kind = instruction.WhichOneof("kind")
        if kind == "reconcile":
            self.ready.set()
            for a in instruction.reconcile.assignments:
                self._assigned(a)
        elif kind == "assignment":
            self._assigned(instruction.assignment)
        elif kind == "cancellation":
            self.gen.result.cancellations += 1
        elif kind == "lease_renewed" and self.sent:
            self.gen.heartbeat_done(time.monotonic() - self.sent.popleft())

    async def _session_loop(self) -> None:
        """Hold Session open; its first message renews and names the worker; reopen
        (bounded) if the broker ends it early."""
        gen = self.gen
        for _ in range(5):
            self.requests = asyncio.Queue()
            self.sent.clear()
            self.sent.append(time.monotonic())
            self.requests.put_nowait(ws.SessionRequest(worker=self.worker))
            self.call = self.stub.Session(self._requests(), metadata=self.metadata)
            try:
                async for instruction in self.call:
                    self._instruction(instruction)
            except grpc.aio.AioRpcError as err:
                if gen.stopping:
                    return
                gen.error("Session", err)
            if gen.stopping:
                return
            gen.result.stream_reconnects += 1
            await asyncio.sleep(1.0)

    async def _stream_loop(self) -> None:
        """Hold StreamInstructions open; reopen (bounded) if the broker ends it early."""
        gen = self.gen
        for _ in range(5):
            self.call = self.stub.StreamInstructions(
                ws.StreamInstructionsRequest(worker=self.worker), metadata=self.metadata
            )
            try:
                async for instruction in self.call:
                    kind = instruction.WhichOneof("kind")
                    if kind == "reconcile":
                        self.ready.set()
                        for a in instruction.reconcile.assignments:
                            self._assigned(a)
                    elif kind == "assignment":
                        self._assigned(instruction.assignment)
                    elif kind == "cancellation":
                        gen.result.cancellations += 1
            except grpc.aio.AioRpcError as err:
                if gen.stopping:
                    return
                gen.error("StreamInstructions", err)
            if gen.stopping:
                return
            gen.result.stream_reconnects += 1
            await asyncio.sleep(1.0)

    def _assigned(self, a: ws.Assignment) -> None:
        key = (a.job, a.attempt)
        if key in self.gen.seen:
            return  # a Reconcile repeats what already runs
        self.gen.seen.add(key)
        self.gen.assigned.append((a.job, time.time()))
        self.tasks.append(asyncio.create_task(self._run(a.job, a.attempt)))

    async def _report(self, job: str, attempt: int, sequence: int, **kind: Any) -> bool:
        event = ws.JobEvent(job=job, attempt=attempt, sequence=sequence, **kind)
        event.time.GetCurrentTime()
        try:
            resp = await self.stub.ReportJobEvents(
                ws.ReportJobEventsRequest(worker=self.worker, events=[event]),
                metadata=self.metadata,
                timeout=REPORT_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as err:
            self.gen.error("ReportJobEvents", err)
            return False
        self.gen.result.reports_ok += 1
        return not resp.stale

    async def _run(self, job: str, attempt: int) -> None:
        gen = self.gen
        if not await self._report(job, attempt, 1, started=ws.Started()):
            return
        gen.result.jobs_started += 1
        await asyncio.sleep(gen.cfg.job_seconds)
        if await self._report(job, attempt, 2, finished=ws.Finished(exit_code=0)):
            gen.result.jobs_finished += 1

    async def heartbeat_loop(self, rnd: random.Random) -> None:
        gen = self.gen
        await asyncio.sleep(rnd.uniform(0, self.interval_s))  # spread the phases
        request = ws.HeartbeatRequest(worker=self.worker)
        timeout = max(1.0, self.interval_s)
        session = gen.cfg.protocol == "session"
        while not gen.stopping:
            t0 = time.monotonic()
            if session:
                # A renewal is a message; its answer (lease_renewed) is timed by
                # _instruction. One still unanswered after the timeout counts as failed.
                while self.sent and t0 - self.sent[0] > timeout:
                    self.sent.popleft()
                    gen.missed("Session", "DEADLINE_EXCEEDED")
                self.sent.append(t0)
                self.requests.put_nowait(ws.SessionRequest())
                pause = self.interval_s * rnd.uniform(0.95, 1.05)
                await asyncio.sleep(pause)
                continue
            try:
                await self.stub.Heartbeat(request, metadata=self.metadata, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                gen.error("Heartbeat", err)
            else:
                gen.heartbeat_done(time.monotonic() - t0)
            pause = self.interval_s * rnd.uniform(0.95, 1.05) - (time.monotonic() - t0)
            await asyncio.sleep(max(0.0, pause))


class LoadGen:
    """K/P agents in one asyncio loop, sharing a few channels; driven by the parent's pipe."""

    def __init__(self, cfg: LoadGenConfig, conn: Any) -> None:
        self.cfg = cfg
        self.conn = conn
        self.result = LoadGenResult(cfg.index)
        self.stopping = False
        self.window = (math.inf, -math.inf)  # wall-clock bounds of the measured window
        self.seen: set[tuple[str, int]] = set()
        self.assigned: list[tuple[str, float]] = []  # (job name, wall time), not yet sent
        self.errors: collections.Counter[str] = collections.Counter()
        self.errors_outside: collections.Counter[str] = collections.Counter()

    def error(self, method: str, err: grpc.aio.AioRpcError) -> None:
        now = time.time()
        inside = self.window[0] <= now <= self.window[1]
        key = f"{method}:{err.code().name}"
        (self.errors if inside else self.errors_outside)[key] += 1
        self.result.error_examples.setdefault(key, str(err.details())[:200])
        if method in ("Heartbeat", "Session"):
            self.result.timeline.setdefault(int(now), [0, 0])[1] += 1

    def missed(self, method: str, code: str) -> None:
        """A renewal on the session went unanswered past its timeout."""
        now = time.time()
        if self.window[0] <= now <= self.window[1]:
            self.errors[f"{method}:{code}"] += 1
        else:
            self.errors_outside[f"{method}:{code}"] += 1
        self.result.timeline.setdefault(int(now), [0, 0])[1] += 1

    def heartbeat_done(self, latency_s: float) -> None:
        self.result.heartbeats_total += 1
        now = time.time()
        self.result.timeline.setdefault(int(now), [0, 0])[0] += 1
        if self.window[0] <= now <= self.window[1]:
            self.result.heartbeats_ok += 1
            self.result.heartbeat_latencies_ms.append(latency_s * 1000)

    async def _recv(self) -> Any:
        return await asyncio.to_thread(self.conn.recv)

    async def run(self) -> None:
        cfg = self.cfg
        rnd = random.Random(cfg.seed)
        channels = [
            grpc.aio.insecure_channel(
                cfg.address,
                # Own subchannel per channel: one TCP connection each, not one shared.
                options=[("grpc.use_local_subchannel_pool", 1), ("rigshift.bench.channel", i)],
            )
            for i in range(cfg.channels)
        ]
        stubs = [wsg.WorkerServiceStub(ch) for ch in channels]
        agents = [
            SimAgent(self, cfg.first_agent + i, stubs[i % len(stubs)]) for i in range(cfg.agents)
        ]
        heartbeats: list[asyncio.Task[None]] = []
        try:
            started = time.monotonic()
            sem = asyncio.Semaphore(cfg.register_concurrency)

            async def enrol(n: int, agent: SimAgent) -> None:
                if cfg.register_rate_per_s > 0:  # a fleet that grows, not a thundering herd
                    await asyncio.sleep(n / cfg.register_rate_per_s)
                async with sem:
                    if not await agent.register():
                        return
                    self.result.registered += 1
                    heartbeats.append(asyncio.create_task(agent.heartbeat_loop(rnd)))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(agent.ready.wait(), cfg.register_timeout_s)

            await asyncio.gather(*(enrol(n, a) for n, a in enumerate(agents)))
            # The load generator's own full collections would show up as broker latency:
            # freeze what registration built, and collect the young generation less often.
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 20, 100)
            self.result.ready = sum(a.ready.is_set() for a in agents)
            self.result.register_s = time.monotonic() - started
            self.result.heartbeat_interval_s = agents[0].interval_s if agents else 0.0
            self.conn.send(("ready", self.result.registered, self.result.ready))
            while True:
                msg = await self._recv()
                if msg[0] == "window":
                    self.window = (msg[1], msg[2])
                elif msg[0] == "query":
                    sent, self.assigned = self.assigned, []
                    self.conn.send(("assigned", sent))
                elif msg[0] == "stop":
                    break
        finally:
            if cfg.drain_on_stop and channels:
                await asyncio.gather(
                    *(
                        ask_broker_to_drain(channels[0], a.metadata, a.worker)
                        for a in agents
                        if a.worker
                    )
                )
            self.stopping = True
            for task in heartbeats:
                task.cancel()
            for agent in agents:
                agent.requests.put_nowait(None)
                if agent.call is not None:
                    agent.call.cancel()
                for task in agent.tasks:
                    task.cancel()
            pending = heartbeats + [t for a in agents for t in a.tasks]
            if pending:
                await asyncio.wait(pending, timeout=5.0)
            for ch in channels:
                await ch.close(grace=None)
        self.result.errors = dict(self.errors)
        self.result.errors_outside_window = dict(self.errors_outside)
        self.conn.send(("assigned", self.assigned))
        self.conn.send(("result", asdict(self.result)))


def loadgen_main(cfg: LoadGenConfig, conn: Any) -> None:
    """Entry point of a load-generator process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us over the pipe
    asyncio.run(LoadGen(cfg, conn).run())


def _healthy(model: str, vram_mb: int) -> farm_pb2.GpuMeasurement | None:
    """A healthy card's self-test figures (its model's reference), so the broker verifies
    the simulated GPUs and places ordinary jobs on them; None for a model without them."""
    ref = reference(model)
    if ref is None:
        return None
    return farm_pb2.GpuMeasurement(
        fp16_gflops=ref.fp16_gflops, fp32_gflops=ref.fp32_gflops, usable_vram_mb=vram_mb
    )
