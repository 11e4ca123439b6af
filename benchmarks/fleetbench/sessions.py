"""A light lease-renewal load generator for ``benchmarks/replica_bench.py``.

One process runs K asyncio agents that only hold a session and renew their lease (no
jobs): registration through their replica (forwarded to the leader), then either

- ``session``: one ``WorkerService/Session`` stream, a renewal every interval, the
  ``lease_renewed`` answers timed on the same stream (issue 17's protocol); or
- ``legacy``: ``StreamInstructions`` held open and a unary ``Heartbeat`` every interval
  (the protocol of agents older than Session, and of the leader before it serves Session).

First renewal at a random phase, then every interval (+-5% jitter). It reports, for the
measurement window the parent announces, the renewals answered, their round trips and
the errors by status code.
"""

from __future__ import annotations

import asyncio
import collections
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from rigshift.v1 import worker_service_pb2 as ws
from rigshift.v1 import worker_service_pb2_grpc as wsg

__all__ = ["SessionLoadConfig", "session_loadgen_main"]

AGENTS_PER_CHANNEL = 500


@dataclass(frozen=True)
class SessionLoadConfig:
    """What one load-generator process runs."""

    targets: list[tuple[str, int, str]]  # (replica address, agents, "session" | "legacy")
    token: str
    interval_s: float
    first: int = 0  # hostname numbering


@dataclass
class _Stats:
    window: tuple[float, float] = (0.0, 0.0)
    ok: int = 0
    rtt_ms: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def answered(self, sent: float, now: float) -> None:
        if self.window[0] <= now <= self.window[1]:
            self.ok += 1
            self.rtt_ms.append((now - sent) * 1000)


async def _register(stub: wsg.WorkerServiceStub, token: str, hostname: str) -> tuple[str, str]:
    gpu = ws.GpuInfo(index=0, uuid=f"SIM-{hostname}", model="RTX 3090", vram_mb=24576)
    for attempt in range(20):
        try:
            resp = await stub.RegisterWorker(
                ws.RegisterWorkerRequest(
                    enrollment_token=token, hostname=hostname, agent_version="bench", gpus=[gpu]
                ),
                timeout=30,
            )
            return resp.worker, resp.credential
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"{hostname} could not register")


async def _session_agent(
    stub: wsg.WorkerServiceStub,
    worker: str,
    credential: str,
    cfg: SessionLoadConfig,
    stats: _Stats,
    ready: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    outgoing: asyncio.Queue[ws.SessionRequest | None] = asyncio.Queue()
    sent: collections.deque[float] = collections.deque()

    async def requests() -> Any:
        while (request := await outgoing.get()) is not None:
            sent.append(time.time())
            yield request

    call = stub.Session(requests(), metadata=(("authorization", f"Bearer {credential}"),))
    outgoing.put_nowait(ws.SessionRequest(worker=worker, status=ws.WorkerStatus()))

    async def renew() -> None:
        await asyncio.sleep(random.uniform(0, cfg.interval_s))
        while not stop.is_set():
            outgoing.put_nowait(ws.SessionRequest())
            await asyncio.sleep(cfg.interval_s * random.uniform(0.95, 1.05))

    renewer = asyncio.get_running_loop().create_task(renew())
    try:
        async for instruction in call:
            kind = instruction.WhichOneof("kind")
            if kind == "lease_renewed" and sent:
                stats.answered(sent.popleft(), time.time())
            elif kind == "reconcile":
                ready.set()
    except grpc.aio.AioRpcError as err:
        if not stop.is_set():
            # The details say which side ended it (a replica's status or gRPC's transport).
            stats.errors[f"Session {err.code().name}: {(err.details() or '')[:80]}"] += 1
    finally:
        renewer.cancel()
        outgoing.put_nowait(None)
        call.cancel()
        ready.set()


async def _legacy_agent(
    stub: wsg.WorkerServiceStub,
    worker: str,
    credential: str,
    cfg: SessionLoadConfig,
    stats: _Stats,
    ready: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    metadata = (("authorization", f"Bearer {credential}"),)
    stream = stub.StreamInstructions(ws.StreamInstructionsRequest(worker=worker), metadata=metadata)

    async def drain() -> None:
        try:
            async for _ in stream:
                ready.set()
        except grpc.aio.AioRpcError as err:
            if not stop.is_set():
                stats.errors[f"StreamInstructions {err.code().name}"] += 1
        finally:
            ready.set()

    drainer = asyncio.get_running_loop().create_task(drain())
    try:
        await asyncio.sleep(random.uniform(0, cfg.interval_s))
        while not stop.is_set():
            started = time.time()
            try:
                await stub.Heartbeat(ws.HeartbeatRequest(worker=worker), metadata=metadata)
                stats.answered(started, time.time())
            except grpc.aio.AioRpcError as err:
                stats.errors[f"Heartbeat {err.code().name}"] += 1
            await asyncio.sleep(cfg.interval_s * random.uniform(0.95, 1.05))
    finally:
        drainer.cancel()
        stream.cancel()


async def _run(cfg: SessionLoadConfig, conn: Any) -> None:
    stats = _Stats()
    stop = asyncio.Event()
    channels: list[grpc.aio.Channel] = []
    agents: list[tuple[wsg.WorkerServiceStub, str]] = []
    for address, count, mode in cfg.targets:
        for i in range(count):
            if i % AGENTS_PER_CHANNEL == 0:
                channels.append(grpc.aio.insecure_channel(address))
            agents.append((wsg.WorkerServiceStub(channels[-1]), mode))
    sem = asyncio.Semaphore(20)

    async def register(n: int, stub: wsg.WorkerServiceStub) -> tuple[str, str]:
        async with sem:
            return await _register(stub, cfg.token, f"bench-{cfg.first + n}")

    ids = await asyncio.gather(*(register(n, stub) for n, (stub, _) in enumerate(agents)))
    print(f"loadgen: {len(ids)} agents registered", file=sys.stderr, flush=True)
    readies = [asyncio.Event() for _ in agents]
    tasks = []
    for (stub, mode), (worker, credential), ready in zip(agents, ids, readies, strict=True):
        run = _session_agent if mode == "session" else _legacy_agent
        tasks.append(asyncio.create_task(run(stub, worker, credential, cfg, stats, ready, stop)))
        await asyncio.sleep(0)
    while not all(r.is_set() for r in readies):
        waiting = sum(not r.is_set() for r in readies)
        print(f"loadgen: {waiting} agents not ready yet", file=sys.stderr, flush=True)
        await asyncio.wait([asyncio.ensure_future(r.wait()) for r in readies], timeout=10)
    conn.send(("ready", len(agents)))
    start, end = await asyncio.to_thread(conn.recv)  # the window, wall clock
    stats.window = (start, end)
    await asyncio.sleep(max(0.0, end - time.time()) + 0.5)
    conn.send(("stats", stats.ok, stats.rtt_ms, dict(stats.errors)))
    await asyncio.to_thread(conn.recv)  # told to stop
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close(grace=None)


def session_loadgen_main(cfg: SessionLoadConfig, conn: Any) -> None:
    """Entry point of a load-generator process (``multiprocessing``, one Pipe end)."""
    asyncio.run(_run(cfg, conn))
