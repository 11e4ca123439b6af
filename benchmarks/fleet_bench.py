"""Fleet benchmark: one real broker process, K simulated agents speaking the real protocol.

    .venv/bin/python benchmarks/fleet_bench.py --agents 1000 --duration-s 30
    .venv/bin/python benchmarks/fleet_bench.py --agents 20 --duration-s 5 --json

It starts ``rigshift broker serve`` on 127.0.0.1 (fresh SQLite home, rate limit off),
creates a farm, and starts ``--processes`` load-generator processes that run K/P
asyncio agents each over a few shared ``grpc.aio`` channels. Every agent calls
RegisterWorker with ``--gpus-per-agent`` GPUs, holds StreamInstructions open (it is
ready once the first Reconcile arrived), heartbeats every
``heartbeat_interval_seconds`` the broker answered (first beat at a random phase,
then with +-5% jitter, as the real agent: sleep(interval - elapsed)), and on each
Assignment reports ``started`` and, ``--job-seconds`` later, ``finished`` (exit 0)
through ReportJobEvents with per-attempt sequence numbers.

Registration is not measured. Once every agent is ready and a short settle period
has passed, the steady-state window of ``--duration-s`` starts: the parent submits
1-GPU jobs with CreateJob (admin key) at ``--submit-rate-per-s``. It reports

* heartbeats/s: heartbeats answered OK whose answer arrived inside the window;
* heartbeat p50/p99: the round trip of those heartbeats, seen by the agent;
* submit->assign p50/p99: from CreateJob returned (``time.time()`` in the parent)
  to the agent receiving the Assignment (``time.time()`` in the load generator;
  one machine, one wall clock). The push can beat the CreateJob answer; such
  samples count as 0 ms (``assign_before_create_returned`` says how many);
* broker CPU % (user+system of all its threads over the window; 100 = one core),
  RSS at the end of the window and the peak sampled every 0.5 s;
* load-generator CPU % (if it is near 100 per process, the load generator and
  not the broker limits the figures), errors by RPC and status code.

After the window, submissions stop and the run waits (at most ``--drain-s``) until
every submitted job has reached an agent. With ``--json`` the last line printed is
one JSON object. Every loop is bounded in count and time; nothing runs after exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import psutil

from rigshift.catalogue import CATALOGUE
from rigshift.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from rigshift.v1 import worker_service_pb2 as ws
from rigshift.v1 import worker_service_pb2_grpc as wsg

FLEET_MODELS = ("RTX 3060", "RTX 3070", "RTX 3080", "RTX 3090", "RX 6800 XT", "A4000")
GPU_MODELS = tuple(m for m in CATALOGUE if m.name in FLEET_MODELS)  # the rigs' models, in turn
AGENTS_PER_CHANNEL = 1_000  # agents sharing one grpc.aio channel (one HTTP/2 connection)
REPORT_TIMEOUT_S = 30.0


def default_submit_rate(agents: int) -> float:
    """Jobs per second when ``--submit-rate-per-s`` is not given: K/100, within 5..50."""
    return float(min(50, max(5, agents // 100)))


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list; NaN for an empty one."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# --- load generator (a child process) ----------------------------------------------------


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
        self.tasks.append(asyncio.create_task(self._stream_loop()))
        return True

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
        while not gen.stopping:
            t0 = time.monotonic()
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
        if method == "Heartbeat":
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
            self.stopping = True
            for task in heartbeats:
                task.cancel()
            for agent in agents:
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


# --- broker process ------------------------------------------------------------------------


class BrokerProcess:
    """``rigshift broker serve`` on 127.0.0.1:0 with its own home and credentials file."""

    def __init__(self, workdir: Path, extra_args: list[str], bare: bool = False) -> None:
        self.bare = bare
        self.home = workdir / "broker-home"
        self.cred_home = workdir / "credentials-home"
        self.log_path = workdir / "broker.log"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self, timeout_s: float = 60.0) -> str:
        exe = Path(sys.executable).with_name("rigshift")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rigshift.cli"]
        cmd += ["broker", "serve", "--listen", "127.0.0.1:0", "--home", str(self.home)]
        cmd += ["--rate-limit-per-s", "0", "--log-level", "WARNING", *self.extra_args]
        if self.bare:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-bare-grpc"]
        env = {**os.environ, "RIGSHIFT_HOME": str(self.cred_home)}
        env.pop("RIGSHIFT_API_KEY", None)
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=open(self.log_path, "w"),  # noqa: SIM115 - closed with the process
            text=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        found: list[str] = []

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                if "listening on" in line:
                    found.append(line.rsplit(" ", 1)[-1].strip())
                    break
            # keep draining so the broker never blocks on a full pipe
            for _ in self.proc.stdout:
                pass

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not found:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker did not start; log:\n{self.log_tail()}")
            time.sleep(0.05)
        self.address = found[0]
        return self.address

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# --- a bare gRPC server, for reference --------------------------------------------------------


def serve_bare_grpc() -> None:
    """WorkerService with empty handlers on grpc.aio: no auth, core, store or interceptors.

    ``--bare-grpc`` drives it instead of the broker, to measure what gRPC alone costs per
    heartbeat on this machine. Stops when its parent's stdin closes or on SIGTERM.
    """

    class Bare(wsg.WorkerServiceServicer):
        def __init__(self) -> None:
            self.workers = 0

        async def RegisterWorker(self, request, context):  # type: ignore[no-untyped-def]
            self.workers += 1
            return ws.RegisterWorkerResponse(
                worker=f"workers/{self.workers}",
                credential="bare",
                lease_ttl_seconds=15,
                heartbeat_interval_seconds=3,
            )

        async def Heartbeat(self, request, context):  # type: ignore[no-untyped-def]
            response = ws.HeartbeatResponse()
            response.lease_expire_time.FromSeconds(int(time.time()) + 15)
            return response

        async def StreamInstructions(self, request, context):  # type: ignore[no-untyped-def]
            yield ws.Instruction(reconcile=ws.Reconcile())
            await asyncio.Event().wait()

        async def ReportJobEvents(self, request, context):  # type: ignore[no-untyped-def]
            return ws.ReportJobEventsResponse(applied=len(request.events))

    async def main() -> None:
        server = grpc.aio.server()
        wsg.add_WorkerServiceServicer_to_server(Bare(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"bare grpc listening on 127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(main())


# --- the parent: submissions, measurements, report ------------------------------------------


class Sampler(threading.Thread):
    """Samples the broker's CPU time and RSS every 0.5 s until stopped."""

    def __init__(self, proc: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.samples: list[tuple[float, float, int]] = []  # (wall, cpu seconds, rss bytes)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                cpu = self.proc.cpu_times()
                self.samples.append(
                    (time.time(), cpu.user + cpu.system, self.proc.memory_info().rss)
                )
            if self._stop_event.wait(0.5):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)

    def cpu_by_second(self) -> dict[int, float]:
        """Broker CPU % per whole second (100 = one core)."""
        out: dict[int, float] = {}
        for (t0, c0, _), (t1, c1, _) in zip(self.samples, self.samples[1:], strict=False):
            if t1 > t0:
                out[int(t1)] = round((c1 - c0) / (t1 - t0) * 100, 1)
        return out


async def submit_jobs(
    address: str,
    api_key: str,
    rate_per_s: float,
    start_wall: float,
    duration_s: float,
    created: dict[str, tuple[float, float]],
    errors: collections.Counter[str],
    job_seconds: float,
) -> int:
    """CreateJob at a steady rate for ``duration_s`` from ``start_wall``; returns how many.

    ``created`` gets job name -> (wall time sent, wall time CreateJob returned).
    """
    count = max(1, round(rate_per_s * duration_s))
    metadata = (("authorization", f"Bearer {api_key}"),)
    limit = asyncio.Semaphore(256)  # bounded in flight
    async with grpc.aio.insecure_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)

        async def one(i: int) -> None:
            spec = job_pb2.JobSpec(
                display_name=f"fleet-bench-{i}",
                command=["sleep", f"{job_seconds:g}"],
                gpu_count=1,
                max_duration_seconds=max(60, int(job_seconds * 10)),
            )
            request = job_service_pb2.CreateJobRequest(spec=spec, request_id=f"fleet-bench-{i}")
            async with limit:
                sent = time.time()
                try:
                    job = await stub.CreateJob(request, metadata=metadata, timeout=30.0)
                except grpc.aio.AioRpcError as err:
                    errors[f"CreateJob:{err.code().name}"] += 1
                    return
                created[job.name] = (sent, time.time())

        tasks = []
        for i in range(count):
            delay = start_wall + i / rate_per_s - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return count


def _poll_assigned(conns: list[Any], assigned: dict[str, float], timeout_s: float = 30.0) -> None:
    for conn in conns:
        conn.send(("query",))
    for conn in conns:
        if not conn.poll(timeout_s):
            raise RuntimeError("a load generator stopped answering")
        kind, items = conn.recv()
        assert kind == "assigned"
        for name, t in items:
            assigned.setdefault(name, t)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One benchmark run; returns the figures."""
    if args.agents < 1 or args.duration_s <= 0 or args.processes < 1:
        raise SystemExit("--agents, --duration-s and --processes must be positive")
    processes = min(args.processes, args.agents)
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine skews every figure
    rate = args.submit_rate_per_s or default_submit_rate(args.agents)
    if args.bare_grpc:
        rate = 0.0  # the bare server has no JobService: heartbeats only
    extra = []
    if args.heartbeat_interval_s:
        extra += ["--heartbeat-interval-s", f"{args.heartbeat_interval_s:g}"]
        extra += ["--lease-ttl-s", f"{max(15.0, 5 * args.heartbeat_interval_s):g}"]
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        broker = BrokerProcess(Path(tmp), extra, bare=args.bare_grpc)
        children: list[Any] = []
        conns: list[Any] = []
        sampler: Sampler | None = None
        try:
            address = broker.start()
            os.environ["RIGSHIFT_HOME"] = str(broker.cred_home)
            os.environ.pop("RIGSHIFT_API_KEY", None)
            from client.sdk import Client
            from rigshift.credentials import lookup_api_key

            api_key, token = "", "bare"
            if not args.bare_grpc:
                api_key = lookup_api_key(address)
                with Client(address, api_key=api_key) as client:
                    token = client.create_farm("bench").enrollment_token
            bproc = psutil.Process(broker.proc.pid)  # type: ignore[union-attr]
            sampler = Sampler(bproc)
            sampler.start()

            ctx = mp.get_context("spawn")
            per = [
                args.agents // processes + (i < args.agents % processes) for i in range(processes)
            ]
            first = 0
            for i, n in enumerate(per):
                parent_end, child_end = ctx.Pipe()
                cfg = LoadGenConfig(
                    index=i,
                    address=address,
                    enrollment_token=token,
                    agents=n,
                    first_agent=first,
                    gpus_per_agent=args.gpus_per_agent,
                    job_seconds=args.job_seconds,
                    channels=args.channels or max(1, min(8, math.ceil(n / AGENTS_PER_CHANNEL))),
                    register_concurrency=args.register_concurrency,
                    register_rate_per_s=args.register_rate_per_s / processes,
                    register_timeout_s=max(60.0, args.agents / 20),
                    seed=args.seed * 1000 + i,
                )
                first += n
                p = ctx.Process(target=loadgen_main, args=(cfg, child_end), daemon=True)
                p.start()
                child_end.close()
                children.append(p)
                conns.append(parent_end)

            # Registration: not measured.
            reg_started = time.monotonic()
            registered = ready = 0
            reg_timeout = 120.0 + args.agents / 20
            for conn in conns:
                left = reg_timeout - (time.monotonic() - reg_started)
                if not conn.poll(max(0.0, left)):
                    raise RuntimeError(f"registration took over {reg_timeout:.0f} s")
                _, r, rd = conn.recv()
                registered += r
                ready += rd
            register_s = time.monotonic() - reg_started
            time.sleep(args.settle_s)

            # The steady-state window.
            ws_wall = time.time() + 0.2
            we_wall = ws_wall + args.duration_s
            for conn in conns:
                conn.send(("window", ws_wall, we_wall))
            gen_procs = [psutil.Process(p.pid) for p in children]
            time.sleep(max(0.0, ws_wall - time.time()))
            cpu0 = bproc.cpu_times()
            gen_cpu0 = [sum(g.cpu_times()[:2]) for g in gen_procs]
            machine0, me0 = busy_seconds(), sum(psutil.Process().cpu_times()[:2])
            wall0 = time.monotonic()
            profiler = None
            if args.profile:
                profiler = subprocess.Popen(
                    [
                        str(Path(sys.executable).with_name("py-spy")),
                        "record",
                        "-d",
                        str(max(1, int(args.duration_s) - 1)),
                        "-p",
                        str(bproc.pid),
                        "-o",
                        args.profile,
                        "-f",
                        "raw",
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            created: dict[str, tuple[float, float]] = {}
            errors: collections.Counter[str] = collections.Counter()
            submitted = 0
            if rate > 0:
                submitted = asyncio.run(
                    submit_jobs(
                        address,
                        api_key,
                        rate,
                        ws_wall,
                        args.duration_s,
                        created,
                        errors,
                        args.job_seconds,
                    )
                )
            time.sleep(max(0.0, we_wall - time.time()))
            cpu1 = bproc.cpu_times()
            gen_cpu1 = [sum(g.cpu_times()[:2]) for g in gen_procs]
            machine1, me1 = busy_seconds(), sum(psutil.Process().cpu_times()[:2])
            wall = time.monotonic() - wall0
            rss_end = bproc.memory_info().rss
            if profiler is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    profiler.wait(30)

            # Drain: every submitted job should reach an agent.
            assigned: dict[str, float] = {}
            deadline = time.monotonic() + args.drain_s
            while True:
                _poll_assigned(conns, assigned)
                if all(n in assigned for n in created) or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
            for conn in conns:
                conn.send(("stop",))
            results = []
            for conn in conns:
                while True:
                    if not conn.poll(60):
                        raise RuntimeError("a load generator did not stop")
                    kind, payload = conn.recv()
                    if kind == "assigned":
                        for name, t in payload:
                            assigned.setdefault(name, t)
                    elif kind == "result":
                        results.append(payload)
                        break
            for p in children:
                p.join(10)
            broker_alive = broker.proc is not None and broker.proc.poll() is None
        finally:
            if sampler is not None:
                sampler.stop()
            for p in children:
                if p.is_alive():
                    p.kill()
                    p.join(5)
            broker.stop()
            if args.broker_log:
                with contextlib.suppress(OSError):
                    Path(args.broker_log).write_text(broker.log_path.read_text())

    if args.timeline:
        print_timeline(results, sampler, ws_wall, we_wall)
    latencies = sorted(x for r in results for x in r["heartbeat_latencies_ms"])
    hb_ok = sum(r["heartbeats_ok"] for r in results)
    s2a, send2a, early = [], [], 0
    for name, (sent, returned) in created.items():
        got = assigned.get(name)
        if got is None:
            continue
        if got < returned:
            early += 1
        s2a.append(max(0.0, got - returned) * 1000)
        send2a.append(max(0.0, got - sent) * 1000)
    s2a.sort()
    send2a.sort()
    outside: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    for r in results:
        errors.update(r["errors"])
        outside.update(r["errors_outside_window"])
        for key, text in r["error_examples"].items():
            examples.setdefault(key, text)
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    gen_cpu = [(b - a) / wall * 100 for a, b in zip(gen_cpu0, gen_cpu1, strict=True)]
    ours = cpu + sum(b - a for a, b in zip(gen_cpu0, gen_cpu1, strict=True)) + (me1 - me0)
    other_cpu = max(0.0, (machine1 - machine0) - ours) / wall * 100
    interval = max((r["heartbeat_interval_s"] for r in results), default=0.0)

    def ms(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 2)

    return {
        "target": "bare-grpc" if args.bare_grpc else "broker",
        "agents": args.agents,
        "registered": registered,
        "ready": ready,
        "gpus_per_agent": args.gpus_per_agent,
        "processes": processes,
        "duration_s": args.duration_s,
        "heartbeat_interval_s": interval,
        "expected_heartbeats_per_s": round(args.agents / interval, 1) if interval else None,
        "heartbeats_per_s": round(hb_ok / wall, 1),
        "heartbeat_p50_ms": ms(percentile(latencies, 50)),
        "heartbeat_p99_ms": ms(percentile(latencies, 99)),
        "heartbeat_max_ms": ms(latencies[-1]) if latencies else None,
        "submit_rate_per_s": rate,
        "jobs_submitted": len(created),
        "jobs_create_attempted": submitted,
        "jobs_assigned": sum(1 for n in created if n in assigned),
        "jobs_finished": sum(r["jobs_finished"] for r in results),
        "submit_to_assign_p50_ms": ms(percentile(s2a, 50)),
        "submit_to_assign_p99_ms": ms(percentile(s2a, 99)),
        "submit_to_assign_max_ms": ms(s2a[-1]) if s2a else None,
        "send_to_assign_p50_ms": ms(percentile(send2a, 50)),
        "send_to_assign_p99_ms": ms(percentile(send2a, 99)),
        "assign_before_create_returned": early,
        "broker_cpu_percent": round(cpu / wall * 100, 1),
        "broker_rss_mb": round(rss_end / 2**20, 1),
        "broker_rss_peak_mb": round(
            max([rss_end] + [m for t, _, m in sampler.samples if ws_wall <= t <= we_wall]) / 2**20,
            1,
        ),
        "loadgen_cpu_percent": [round(x, 1) for x in gen_cpu],
        "other_cpu_percent": round(other_cpu, 1),
        "register_s": round(register_s, 2),
        "stream_reconnects": sum(r["stream_reconnects"] for r in results),
        "cancellations": sum(r["cancellations"] for r in results),
        "errors": dict(sorted(errors.items())),
        "errors_outside_window": dict(sorted(outside.items())),
        "error_examples": dict(sorted(examples.items())),
        "broker_alive": broker_alive,
        "loadavg_1m_before": load_before,
        "machine": f"{os.cpu_count()} CPU, {platform.python_implementation()} "
        f"{platform.python_version()}",
    }


def print_timeline(
    results: list[dict[str, Any]], sampler: Sampler | None, ws_wall: float, we_wall: float
) -> None:
    """Per second: heartbeats answered OK, failed, and broker CPU % (to stderr)."""
    merged: dict[int, list[int]] = {}
    for r in results:
        for sec, (ok, bad) in r["timeline"].items():
            m = merged.setdefault(int(sec), [0, 0])
            m[0] += ok
            m[1] += bad
    cpu = sampler.cpu_by_second() if sampler is not None else {}
    print(
        "t_s  heartbeats_ok  heartbeats_failed  broker_cpu_%  (t=0: window start)", file=sys.stderr
    )
    for sec in sorted(set(merged) | set(cpu)):
        ok, bad = merged.get(sec, (0, 0))
        mark = "*" if ws_wall <= sec < we_wall else " "
        print(
            f"{sec - int(ws_wall):+5d}{mark} {ok:7d} {bad:7d} {cpu.get(sec, float('nan')):7.1f}",
            file=sys.stderr,
        )


def human(r: dict[str, Any]) -> str:
    """A short readable summary."""
    return "\n".join(
        [
            f"agents {r['agents']} ({r['ready']} ready, registered in {r['register_s']} s), "
            f"{r['gpus_per_agent']} GPUs each, {r['processes']} load-generator process(es)",
            f"heartbeats/s {r['heartbeats_per_s']} (expected {r['expected_heartbeats_per_s']}), "
            f"latency p50 {r['heartbeat_p50_ms']} ms, p99 {r['heartbeat_p99_ms']} ms",
            f"jobs {r['jobs_submitted']} submitted at {r['submit_rate_per_s']}/s, "
            f"{r['jobs_assigned']} assigned, {r['jobs_finished']} finished; submit->assign "
            f"p50 {r['submit_to_assign_p50_ms']} ms, p99 {r['submit_to_assign_p99_ms']} ms",
            f"broker CPU {r['broker_cpu_percent']} %, RSS {r['broker_rss_mb']} MB "
            f"(peak {r['broker_rss_peak_mb']} MB); load generator CPU "
            f"{r['loadgen_cpu_percent']} %; other processes on the machine "
            f"{r['other_cpu_percent']} %",
            f"errors in the window {r['errors'] or 'none'}; outside it (registration, drain) "
            f"{r['errors_outside_window'] or 'none'}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=0, help="simulated agents (K)")
    p.add_argument("--duration-s", type=float, default=0.0, help="measured window")
    p.add_argument("--gpus-per-agent", type=int, default=8)
    p.add_argument("--job-seconds", type=float, default=2.0, help="how long each job 'runs'")
    p.add_argument(
        "--submit-rate-per-s", type=float, default=0.0, help="default: K/100 within 5..50"
    )
    p.add_argument("--processes", type=int, default=1, help="load-generator processes")
    p.add_argument("--channels", type=int, default=0, help="grpc channels per process")
    p.add_argument(
        "--heartbeat-interval-s", type=float, default=0.0, help="broker's (default: its own, 3 s)"
    )
    p.add_argument("--register-concurrency", type=int, default=8)
    p.add_argument(
        "--register-rate-per-s", type=float, default=100.0, help="agents joining per second"
    )
    p.add_argument("--settle-s", type=float, default=3.0, help="pause after registration")
    p.add_argument("--drain-s", type=float, default=15.0, help="max wait for late assignments")
    p.add_argument("--profile", default="", help="py-spy raw profile of the broker to this file")
    p.add_argument("--broker-log", default="", help="copy the broker's stderr log here")
    p.add_argument("--timeline", action="store_true", help="per-second table to stderr")
    p.add_argument(
        "--bare-grpc",
        action="store_true",
        help="drive an empty grpc.aio WorkerService instead of the broker (heartbeats only)",
    )
    p.add_argument("--serve-bare-grpc", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    args = p.parse_args(argv)
    if args.serve_bare_grpc:
        serve_bare_grpc()
        return 0
    if args.agents < 1 or args.duration_s <= 0:
        p.error("--agents and --duration-s are required and must be positive")
    result = run(args)
    print(human(result), flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
