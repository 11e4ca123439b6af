"""One rig's worker agent: its lifecycle, and the shell that carries out its decisions.

Lifecycle (Temporal's ``Worker`` contract)::

    agent = Agent(config)
    await agent.run()          # returns only after a graceful drain
    # or
    async with Agent(config) as agent:   # starts run() and waits until registered
        ...
    # elsewhere: agent.request_shutdown() (signal handlers), await agent.shutdown() (idempotent)

Three parts::

    AgentState     state_machine.py   the decisions: events in, instructions out, no I/O
    BrokerSession  session.py         the broker: register, heartbeat, instructions,
                                      reports; turns them into events
    Agent          here               starts the parts, feeds every event to the state
                                      (``_handle``) and carries out its instructions
                                      (``_do``): the AttemptRunner, the miners, the
                                      outbox, the lease fence file, the stream

Tasks while online, each kept running by ``supervise`` (a loop that ends is logged and
restarted; one that keeps ending stops the agent with an error, never with a drain)::

    heartbeat   BrokerSession.heartbeat_loop: a renewal on the session stream (a Heartbeat
                call against a broker without Session); a failure resets the stream
    lease       stops the running attempts before the broker may requeue them when no
                heartbeat is answered (``lease.py``: fencing, on the monotonic clock)
    stream      BrokerSession.stream_loop: the Session (StreamInstructions against an older
                broker): Reconcile, then Assignment / Cancellation
    reporter    BrokerSession.reporter_loop: the Outbox's job events
    meter       samples power for GPUs without an energy counter; cumulative energy progress;
                reads the GPUs' sensors for the metrics
    mining      every ``mining.check_interval_s``: the mining policy for GPUs without an
                attempt (``mining.py``); an assignment on a mining GPU waits until the
                miner's process tree is gone before the attempt starts
    health      every ``[health] interval_s``: each GPU's health -> GpuFaulted (quarantine
                that GPU only), ProbationDue (``health_loop.py``)
    health-report  ReportGpuHealth whenever the state says so, until the broker takes it

The metrics (``metrics.py``) never read the agent from Prometheus' scrape thread: the
event loop publishes an immutable :class:`~worker_agent.metrics.AgentSnapshot` after
every event, mining tick and sensor reading, and the collector reads that.

Drain (SIGTERM, :meth:`request_shutdown`): accept nothing new and ask the broker
to drain the worker, let running attempts finish for ``drain_grace_s``, then hand
the rest back (stop them without a final report, so the broker requeues them
when the lease lapses), flush the outbox, stop Ray, return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Coroutine
from typing import Any

import grpc

from rigshift.v1 import worker_service_pb2 as ws
from worker_agent import state_machine as sm
from worker_agent.agent_parts import make_runner
from worker_agent.attempts import AttemptRunner
from worker_agent.broker_calls import gpu_infos
from worker_agent.config import AgentConfig
from worker_agent.containers import detect as detect_containers
from worker_agent.energy import EnergyMeter
from worker_agent.executor import RayExecutor
from worker_agent.fence import FENCE_FILE, write_deadline
from worker_agent.fence import clock as fence_clock
from worker_agent.gpu import GpuBackend, open_backend
from worker_agent.health import parse_fault
from worker_agent.health_loop import HealthShell, health_protos
from worker_agent.identity import load_identity
from worker_agent.images import ImageCache
from worker_agent.launch import Executor, LocalExecutor
from worker_agent.lease import STOP_MARGIN_S, Lease
from worker_agent.metrics import (
    AgentMetrics,
    AgentSnapshot,
    GpuReading,
    read_sensors,
    serve_metrics,
)
from worker_agent.mining import MiningSupervisor
from worker_agent.outbox import Outbox
from worker_agent.power import PowerLimits
from worker_agent.quarantine import QuarantineBook
from worker_agent.sandbox import policy_for
from worker_agent.selftest import RigFigures, fill_gpu_infos, host_proto, log_figures, measure_rig
from worker_agent.session import AgentError, BrokerSession
from worker_agent.supervise import LoopFailed, supervise

__all__ = ["Agent", "AgentError"]

log = logging.getLogger("rigshift.agent")


class Agent:
    """One rig's worker agent (see the module docstring)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        backend: GpuBackend | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.executor = executor
        self.state = "new"
        self.meter: EnergyMeter | None = None
        self.outbox = Outbox(max_log_backlog_bytes=config.max_log_backlog_bytes)
        self.runner: AttemptRunner | None = None
        self.mining: MiningSupervisor | None = None
        self.power: PowerLimits | None = None
        """Attempts' power caps and the operator's limits (``power.py``)."""
        self.health: HealthShell | None = None
        """GPU health polling, reports and re-tests (``health_loop.py``)."""
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._done = asyncio.Event()
        self._wake = asyncio.Event()
        self.machine = sm.AgentState(
            Lease(
                config.lease_ttl_s,
                config.lease_grace_s,
                config.cancel_grace_s + STOP_MARGIN_S,
                renewed_at=time.monotonic(),
            ),
            QuarantineBook(probation_s=config.health.probation_s),
        )
        """The agent's decisions (``state_machine.py``); this class carries them out."""
        self.session = BrokerSession(
            config,
            self.outbox,
            self._wake,
            self._stopping,
            handle=self._handle,
            mining_gpus=self._mining_gpus,
            environments=self._environments,
            gpu_infos=self._gpu_infos,
            on_rtt=self._observe_rtt,
            images=self._images,
        )
        """The connection to the broker (``session.py``)."""
        self._run_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics: AgentMetrics | None = None
        self._metrics_server: Any = None
        self.snapshot = AgentSnapshot()
        """What the metrics show, published by the event loop (read from the scrape thread)."""
        self._readings: dict[int, GpuReading] = {}
        self._asks: dict[int, int] = {}
        self.selftest: RigFigures | None = None
        """The start's self-test (``selftest.py``), registered with the GPUs; None: none ran."""
        # Background work the instructions start (stopping miners, asking for a drain).
        self._background: set[asyncio.Task[object]] = set()

    # --- what the session knows -----------------------------------------------------------

    @property
    def lease(self) -> Lease:
        """The lease as the agent sees it (``lease.py``)."""
        return self.machine.lease

    @property
    def worker(self) -> str:
        """The worker's resource name ("" until registered)."""
        return self.session.worker

    @property
    def heartbeat_interval_s(self) -> float:
        """The heartbeat interval in effect (the broker may ask for a shorter one)."""
        return self.session.heartbeat_interval_s

    @property
    def lease_ttl_s(self) -> float:
        """The broker's lease TTL."""
        return self.session.lease_ttl_s

    @property
    def last_heartbeat_rtt_s(self) -> float:
        """Round trip of the last answered heartbeat."""
        return self.session.last_heartbeat_rtt_s

    @property
    def metrics_address(self) -> str:
        """``host:port`` of ``/metrics`` ("" without ``metrics_listen``)."""
        return self.session.metrics_address

    @property
    def _channel(self) -> grpc.aio.Channel | None:
        return self.session.channel

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return self.session.metadata()

    # --- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        self._run_task = asyncio.create_task(self.run(), name="agent.run")
        ready = asyncio.create_task(self.session.registered.wait())
        await asyncio.wait({ready, self._run_task}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._run_task.done():
            self._run_task.result()  # raises the startup error
            raise AgentError("the agent stopped before it registered")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    def request_shutdown(self, *, force: bool = False) -> None:
        """Start a graceful drain (safe from signal handlers, safe to call many times).

        ``force`` ends the drain grace at once: running attempts are handed back.
        """
        if force and not self._force.is_set():
            log.info("forced shutdown: no more drain grace")
            self._force.set()
        if not self._stopping.is_set():
            log.info("shutdown requested")
            self._stopping.set()

    async def shutdown(self) -> None:
        """Drain and wait until :meth:`run` has returned; safe to call twice."""
        self.request_shutdown()
        if self.state != "new":
            await self._done.wait()
        if self._run_task is not None and self._run_task.done() and not self._run_task.cancelled():
            self._run_task.result()

    async def wait_registered(self, timeout_s: float | None = None) -> None:
        """Wait until the agent holds a worker identity."""
        await asyncio.wait_for(self.session.registered.wait(), timeout_s)

    async def run(self) -> None:
        """Serve until shutdown is requested, then drain; returns after the drain.

        Raises :class:`AgentError` without a drain (running attempts are handed back) when
        the broker refuses the enrollment token or a loop keeps failing (``supervise``).
        """
        if self.state != "new":
            raise RuntimeError("Agent.run() may be called once")
        self.state = "starting"
        try:
            await self._start()
            if not self._stopping.is_set():
                self.state = "online"
                loops = {
                    "heartbeat": self.session.heartbeat_loop,
                    "lease": self._lease_loop,
                    "stream": self.session.stream_loop,
                    "reporter": self.session.reporter_loop,
                    "meter": self._meter_loop,
                    "mining": self._mining_loop,
                }
                if self.health is not None:
                    loops["health"] = self.health.poll_loop
                    loops["health-report"] = self.health.report_loop
                self._tasks = [
                    asyncio.create_task(supervise(name, loop), name=name)
                    for name, loop in loops.items()
                ]
                stop = asyncio.create_task(self._stopping.wait())
                await asyncio.wait([stop, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                # Only a shutdown request drains. A supervisor ends only when its loop kept
                # failing: stop with an error (exit non-zero, so systemd restarts the agent).
                for task in self._tasks:
                    if task.done():
                        err = None if task.cancelled() else task.exception()
                        log.error("agent task %s ended: stopping with an error", task.get_name())
                        if isinstance(err, LoopFailed):
                            raise AgentError(str(err)) from err
                        raise AgentError(f"agent task {task.get_name()} ended") from err
                await self._drain()
        finally:
            await self._close()
            self.state = "stopped"
            self._done.set()

    async def _start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        identity = load_identity(cfg.state_dir)
        if self.backend is None:
            faults = [parse_fault(f) for f in cfg.simulate_faults]
            self.backend = open_backend(cfg.simulate, seed=identity.rig_id, faults=faults)
        self.meter = EnergyMeter(self.backend)
        self.power = PowerLimits(self.backend, cfg.state_dir)
        self._asks = {g.index: g.price_micros_per_gpu_hour for g in self._gpu_infos()}
        if self.executor is None:
            self.executor = RayExecutor(
                len(self.backend.gpus()),
                address=cfg.ray_address,
                token_path=cfg.ray_token_path
                if (cfg.ray_auth_token_path or not cfg.ray_address)
                else None,
                dashboard=cfg.ray_dashboard,
                flush_s=cfg.report_flush_s,
                kill_grace_s=cfg.cancel_grace_s,
                sandbox=policy_for(cfg),
            )
        if isinstance(self.executor, LocalExecutor | RayExecutor):
            self.executor.fence_file = str(cfg.state_dir / FENCE_FILE)  # jobs' lease fences
        await self.executor.start()
        session = self.session
        runtime = await asyncio.to_thread(detect_containers, cfg.containers)
        images = None
        if runtime is not None:
            images = ImageCache(
                cfg.state_dir / "containers", runtime, cfg.containers, rig=identity.rig_id
            )
            await images.remove_orphans()
            await images.forget_missing()
            session.container_runtime = (runtime.name, runtime.version)
        self.runner = make_runner(
            cfg, self.backend, self.meter, self.executor, self.outbox, session, self._wake, images
        )
        self.runner.on_unhealthy = self._on_unhealthy
        self.runner.on_started = lambda key: self._attempt_power(key, started=True)
        self.runner.on_ended = lambda key: self._attempt_power(key, started=False)
        self.mining = MiningSupervisor(
            cfg.mining,
            self.backend,
            self.meter,
            asks_micros_per_gpu_hour=self._asks,
            state_dir=cfg.state_dir,
        )
        session.on_curtail = self.mining.curtail
        self.health = HealthShell(
            self.backend,
            cfg.health,
            handle=self._handle,
            report=self._health_report,
            send=session.report_gpu_health,
            retry_min_s=cfg.reconnect_min_s,
            retry_max_s=cfg.reconnect_max_s,
            python=cfg.selftest_python,
        )
        if cfg.metrics_listen:
            self.metrics = AgentMetrics(lambda: self.snapshot)
            self._read_sensors()
            self._metrics_server = serve_metrics(self.metrics, cfg.metrics_listen)
            host, port = self._metrics_server.server_address[:2]
            session.metrics_address = f"{host}:{port}"
            log.info("metrics on http://%s/metrics", session.metrics_address)
        if cfg.selftest_at_start:  # before registering: no GPU holds a job yet
            self.selftest = await measure_rig(
                self.backend,
                cfg.state_dir,
                budget_s=cfg.selftest_budget_s,
                python=cfg.selftest_python,
                power=self.power,
            )
            log_figures(self.backend, self.selftest)
            session.host = host_proto(self.selftest.host)
        else:
            self.power.probe()  # may the agent set power limits? (power_limit_settable)
        await session.open(identity)

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for work in list(self._background):
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
        if self.health is not None:
            await self.health.close()
        if self.mining is not None:
            with contextlib.suppress(Exception):
                await self.mining.close()
        if self.runner is not None:
            await self.runner.stop_all("agent stopped", report=False, wait=True)
        if self.power is not None:
            self.power.restore(self.power.operator)
        if self.executor is not None:
            with contextlib.suppress(Exception):
                await self.executor.close()
        await self.session.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.backend is not None:
            with contextlib.suppress(Exception):
                self.backend.close()

    async def _drain(self) -> None:
        self.state = "draining"
        runner = self.runner
        assert runner is not None
        for instruction in self.machine.handle(sm.DrainRequested()):
            if isinstance(instruction, sm.AskBrokerToDrain) and not instruction.until_taken:
                await self.session.ask_to_drain()  # before the grace: nothing new is placed
            else:
                self._do([instruction])
        deadline = time.monotonic() + self.config.drain_grace_s
        while runner.runs and time.monotonic() < deadline and not self._force.is_set():
            await asyncio.sleep(0.1)
        if runner.runs:
            log.warning(
                "drain grace of %.0f s is over: handing back %d attempt(s) to the broker",
                self.config.drain_grace_s,
                len(runner.runs),
            )
            self._handle(sm.DrainGraceOver())
            await runner.wait_all()
        deadline = time.monotonic() + 5.0
        while not self.outbox.empty() and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.05)
        if not self.outbox.empty():
            log.warning("stopping with job events the broker has not acknowledged")
        log.info("drained")

    def _on_unhealthy(self, reason: str) -> None:
        """The rig can take no work (``AttemptRunner.on_unhealthy``: e.g. its state
        directory is full): it refuses new assignments and has the broker place nothing
        more here. Running attempts go on; the agent itself does not drain (a restart
        brings the worker back ONLINE)."""
        self._handle(sm.RigUnhealthy(reason))

    # --- the decisions, carried out -----------------------------------------------------

    def _handle(self, event: sm.Event) -> None:
        """Apply an event to the agent's state and carry out what it decides."""
        self._do(self.machine.handle(event))
        self._publish()

    def _do(self, instructions: list[sm.Instruction]) -> None:
        runner = self.runner
        assert runner is not None
        for i in instructions:
            if isinstance(i, sm.StartAttempt):
                runner.start(i.assignment)
            elif isinstance(i, sm.StopAttempt):
                runner.stop(i.key, i.reason, report=i.report)
            elif isinstance(i, sm.StopMiners):
                self._spawn(self._stop_miners(i.assignment), "{}#{}".format(*_key(i.assignment)))
            elif isinstance(i, sm.RefuseAttempt):
                runner.refuse(i.key, i.reason)
            elif isinstance(i, sm.DropAttempt):
                self.outbox.finished(i.key, -signal.SIGTERM, 0, i.reason, time.time())
                self._wake.set()
            elif isinstance(i, sm.WriteFence):
                self._write_fence()
            elif isinstance(i, sm.ResetStream):
                self.session.reset_stream(i.why)
            elif isinstance(i, sm.ReportGpuHealth):
                if self.health is not None:
                    self.health.request_report()
            elif isinstance(i, sm.RunSelfTest):
                if self.health is not None:
                    self.health.run_selftest(i.index)
            elif isinstance(i, sm.AskBrokerToDrain):
                if i.until_taken:
                    self._spawn(self.session.drain_until_taken(i.reason), "unhealthy")
                else:
                    self._spawn(self.session.ask_to_drain(), "drain")
            else:  # pragma: no cover - every instruction is handled above
                raise TypeError(f"unknown instruction {i!r}")

    def _attempt_power(self, key: tuple[str, int], *, started: bool) -> None:
        """An attempt started (cap its GPUs at ``Assignment.power_limit_watts``) or ended
        (the operator's limit again); then the state machine hears of it."""
        assert self.power is not None and self.runner is not None
        run = self.runner.runs.get(key)
        if started and run is not None:
            a = run.assignment
            self.power.attempt_started(key, a.gpu_indices, a.power_limit_watts)
        elif not started:
            self.power.attempt_ended(key)
        self._handle(sm.AttemptStarted(key) if started else sm.AttemptEnded(key))

    def _spawn(self, coro: Coroutine[Any, Any, object], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stop_miners(self, assignment: ws.Assignment) -> None:
        """Stop the miners on the assignment's GPUs, then tell the state they are gone."""
        assert self.mining is not None
        try:
            await self.mining.release(list(assignment.gpu_indices))
        except asyncio.CancelledError:
            raise
        except Exception:
            self._handle(sm.MinersStopped(_key(assignment), ok=False))
            raise
        self._handle(sm.MinersStopped(_key(assignment)))

    def _write_fence(self) -> None:
        """Write the lease's stop time for the jobs' fences (``fence.py``); when it cannot
        be written the file goes, so no fence acts on a stale time (the agent's own stays)."""
        path = self.config.state_dir / FENCE_FILE
        try:
            write_deadline(path, self.lease.fence_at(time.monotonic(), fence_clock()))
        except OSError as err:
            with contextlib.suppress(OSError):
                path.unlink()
            log.warning("lease fence file %s not written (%s): jobs unfenced", path, err)

    # --- what the session and the metrics read -----------------------------------------

    def _gpu_infos(self) -> list[ws.GpuInfo]:
        assert self.backend is not None
        health = {h.index: h for h in self._health_report()}
        settable = self.power.settable if self.power is not None else None
        infos = gpu_infos(self.backend, self.config.price_micros_per_gpu_hour, health, settable)
        return fill_gpu_infos(infos, self.selftest)

    def _health_report(self) -> list[ws.GpuHealth]:
        """The rig's whole GPU health (what ReportGpuHealth and the registration send)."""
        return health_protos(self.machine.quarantine.report(time.monotonic()))

    def _mining_gpus(self) -> frozenset[int]:
        """GPUs a miner holds now (running or stopping)."""
        return self.mining.held_by_miners() if self.mining is not None else frozenset()

    def _environments(self) -> list[str]:
        """The Python environments the rig holds (the heartbeat's status)."""
        runner = self.runner
        return runner.environments.held() if runner is not None and runner.environments else []

    def _images(self) -> list[str]:
        """The container images the rig holds (the heartbeat's status)."""
        runner = self.runner
        return runner.images.held() if runner is not None and runner.images else []

    def _observe_rtt(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.heartbeat_rtt.observe(seconds)

    def _read_sensors(self) -> None:
        """Read the GPUs' sensors for the metrics (on the event loop) and publish them."""
        if self.metrics is not None and self.backend is not None and self.meter is not None:
            self._readings = read_sensors(self.backend, self.meter)
            self._publish()

    def _publish(self) -> None:
        """Swap in a new snapshot for the metrics (the scrape thread reads only that)."""
        if self.metrics is None or self.backend is None:
            return
        self.snapshot = AgentSnapshot.build(
            self.backend.gpus(),
            self._readings,
            ai=self.machine.busy_gpus(started=True),
            mining=self.mining.mining() if self.mining is not None else frozenset(),
            quarantined=self.machine.quarantine.quarantined(),
            asks=self._asks,
            jobs_running=len(self.machine.running),
            power_limits=dict(self.power.current) if self.power is not None else None,
            curtailed=self.mining is not None and self.mining.curtailed(),
        )

    # --- loops --------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        """Stop the running attempts when the lease runs out (``Lease.stop_at``)."""
        while True:
            now = time.monotonic()
            self._handle(sm.LeaseCheck(now))
            await asyncio.sleep(min(0.25, max(0.02, self.lease.stop_at - now)))

    async def _meter_loop(self) -> None:
        assert self.meter is not None and self.runner is not None
        cfg = self.config
        next_progress = time.monotonic() + cfg.progress_interval_s
        while True:
            await asyncio.sleep(min(cfg.energy_sample_interval_s, cfg.progress_interval_s))
            self.meter.sample()
            self._read_sensors()
            if time.monotonic() >= next_progress:
                next_progress += cfg.progress_interval_s
                self.runner.report_progress()

    async def _mining_loop(self) -> None:
        assert self.mining is not None
        interval = self.mining.config.check_interval_s
        while True:
            if self.state != "draining":  # a rig going down starts no new miners
                self.mining.tick(self.machine.busy_gpus())
                self._publish()
            await asyncio.sleep(interval)


def _key(assignment: ws.Assignment) -> tuple[str, int]:
    return (assignment.job, assignment.attempt)
