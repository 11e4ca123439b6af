"""The agent's session with the broker: register, heartbeat, follow instructions, report.

Lifecycle (Temporal's ``Worker`` contract)::

    agent = Agent(config)
    await agent.run()          # returns only after a graceful drain
    # or
    async with Agent(config) as agent:   # starts run() and waits until registered
        ...
    # elsewhere: agent.request_shutdown() (signal handlers), await agent.shutdown() (idempotent)

Tasks while online, each kept running by ``supervise`` (a loop that ends is logged and
restarted; one that keeps ending stops the agent with an error, never with a drain)::

    heartbeat   Heartbeat every interval; UNAUTHENTICATED/NOT_FOUND → register again;
                a failure resets the instruction stream (it may be half-open)
    lease       stops the running attempts before the broker may requeue them when no
                heartbeat is answered (``lease.py``: fencing, on the monotonic clock)
    stream      StreamInstructions; the first message is a Reconcile (start what is missing,
                stop what is not listed), then Assignment / Cancellation; reconnects with
                backoff and full jitter whenever the stream breaks or is reset
    reporter    ReportJobEvents from the Outbox: starts and finishes at once, output batched;
                a failed batch is retried unchanged; ``stale`` attempts are stopped
    meter       samples power for GPUs without an energy counter; cumulative energy progress
    mining      every ``mining.check_interval_s``: the mining policy for GPUs without an
                attempt (``mining.py``); an assignment on a mining GPU waits until the
                miner's process tree is gone before the attempt starts

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
from collections import OrderedDict
from typing import Any

import grpc

from rigshift.v1 import farm_service_pb2, farm_service_pb2_grpc
from rigshift.v1 import worker_service_pb2 as ws
from rigshift.v1 import worker_service_pb2_grpc as wsg
from worker_agent.attempts import AttemptRunner
from worker_agent.backoff import Backoff
from worker_agent.channel import broker_channel
from worker_agent.checkpoints import CheckpointWatcher
from worker_agent.config import AgentConfig, effective_heartbeat_s
from worker_agent.energy import EnergyMeter
from worker_agent.environments import EnvironmentCache, job_python
from worker_agent.executor import Executor, LocalExecutor, RayExecutor
from worker_agent.fence import FENCE_FILE, write_deadline
from worker_agent.fence import clock as fence_clock
from worker_agent.gpu import GpuBackend, open_backend
from worker_agent.lease import STOP_MARGIN_S, Lease, is_refusal
from worker_agent.metrics import AgentMetrics, serve_metrics
from worker_agent.mining import MiningSupervisor
from worker_agent.outbox import AttemptKey, Outbox
from worker_agent.sandbox import policy_for
from worker_agent.identity import Identity, load_identity, save_identity
from worker_agent.supervise import LoopFailed, stopping, supervise
from worker_agent.workdir import Workspace

__all__ = ["Agent", "AgentError"]

log = logging.getLogger("rigshift.agent")

_REREGISTER = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
}
_FATAL_AT_REGISTRATION = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
}


class AgentError(Exception):
    """The agent cannot go on (e.g. the broker refused the enrollment token)."""


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
        self.worker = ""
        self.heartbeat_interval_s = config.heartbeat_interval_s
        self.lease_ttl_s = config.lease_ttl_s
        self.last_heartbeat_rtt_s = 0.0
        self.state = "new"
        self.meter: EnergyMeter | None = None
        self.outbox = Outbox(max_log_backlog_bytes=config.max_log_backlog_bytes)
        self.runner: AttemptRunner | None = None
        self._credential = ""
        self._identity: Identity | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: wsg.WorkerServiceStub | None = None
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._registered = asyncio.Event()
        self._done = asyncio.Event()
        self._wake = asyncio.Event()
        self._register_lock = asyncio.Lock()
        self._stream_call: grpc.aio.UnaryStreamCall | None = None
        self._stream_reset = ""  # why the agent cancelled the stream call
        self.lease = Lease(
            config.lease_ttl_s,
            config.lease_grace_s,
            config.cancel_grace_s + STOP_MARGIN_S,
            renewed_at=time.monotonic(),
        )
        self._registered_at = float("-inf")
        # Attempts stopped because the lease ran out, and whether the broker must be asked
        # again what this rig should run (a Reconcile) once it answers.
        self._fenced: set[AttemptKey] = set()
        self._resync = False
        self._run_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reported_finished: OrderedDict[AttemptKey, None] = OrderedDict()
        self.metrics: AgentMetrics | None = None
        self.metrics_address = ""
        self._metrics_server: Any = None
        self.mining: MiningSupervisor | None = None
        # Assignments waiting for miners to stop on their GPUs, and why to drop one instead.
        self._pending: dict[AttemptKey, ws.Assignment] = {}
        self._pending_stops: dict[AttemptKey, str] = {}
        self._pending_tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        self._run_task = asyncio.create_task(self.run(), name="agent.run")
        ready = asyncio.create_task(self._registered.wait())
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
        await asyncio.wait_for(self._registered.wait(), timeout_s)

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
                    "heartbeat": self._heartbeat_loop,
                    "lease": self._lease_loop,
                    "stream": self._stream_loop,
                    "reporter": self._reporter_loop,
                    "meter": self._meter_loop,
                    "mining": self._mining_loop,
                }
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
        self._identity = load_identity(cfg.state_dir)
        if self.backend is None:
            self.backend = open_backend(cfg.simulate, seed=self._identity.rig_id)
        self.meter = EnergyMeter(self.backend)
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
        self.runner = AttemptRunner(
            cfg,
            self.backend,
            self.meter,
            self.executor,
            self.outbox,
            Workspace(cfg.state_dir),
            self._download,
            self._wake,
            CheckpointWatcher(
                self._upload,
                self.outbox,
                self._wake,
                interval_s=cfg.checkpoint_scan_interval_s,
                max_bytes=cfg.max_checkpoint_bytes,
            ),
            environments=EnvironmentCache(
                cfg.state_dir / "environments",
                cfg.environments,
                python=job_python(
                    cfg.environments.python,
                    _job_uid(getattr(self.executor, "isolation", None)),
                    log.warning,
                ),
            ),
            upload_output=self._upload_output,
        )
        self.runner.on_unhealthy = self._on_unhealthy
        self.mining = MiningSupervisor(
            cfg.mining,
            self.backend,
            self.meter,
            asks_micros_per_gpu_hour={
                g.index: g.price_micros_per_gpu_hour for g in self._gpu_infos()
            },
            state_dir=cfg.state_dir,
        )
        if cfg.metrics_listen:
            self.metrics = AgentMetrics(self)
            self._metrics_server = serve_metrics(self.metrics, cfg.metrics_listen)
            host, port = self._metrics_server.server_address[:2]
            self.metrics_address = f"{host}:{port}"
            log.info("metrics on http://%s/metrics", self.metrics_address)
        self._channel = broker_channel(cfg)
        self._stub = wsg.WorkerServiceStub(self._channel)
        await self._register(first=True)

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for task in list(self._pending_tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.mining is not None:
            with contextlib.suppress(Exception):
                await self.mining.close()
        if self.runner is not None:
            await self.runner.stop_all("agent stopped", report=False, wait=True)
        if self.executor is not None:
            with contextlib.suppress(Exception):
                await self.executor.close()
        if self._channel is not None:
            await self._channel.close()
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
        runner.accepting = False
        log.info("draining: accepting no new work, %d attempt(s) running", len(runner.runs))
        await self._ask_broker_to_drain()
        deadline = time.monotonic() + self.config.drain_grace_s
        while runner.runs and time.monotonic() < deadline and not self._force.is_set():
            await asyncio.sleep(0.1)
        if runner.runs:
            log.warning(
                "drain grace of %.0f s is over: handing back %d attempt(s) to the broker",
                self.config.drain_grace_s,
                len(runner.runs),
            )
            await runner.stop_all("handed back: agent shutting down", report=False, wait=True)
        deadline = time.monotonic() + 5.0
        while not self.outbox.empty() and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.05)
        if not self.outbox.empty():
            log.warning("stopping with job events the broker has not acknowledged")
        log.info("drained")

    async def _ask_broker_to_drain(self) -> bool:
        """Best effort: FarmService.DrainWorker so the broker stops placing work here;
        whether the broker took it."""
        if not self.worker or self._channel is None:
            return False
        try:
            await farm_service_pb2_grpc.FarmServiceStub(self._channel).DrainWorker(
                farm_service_pb2.DrainWorkerRequest(name=self.worker),
                metadata=self._metadata(),
                timeout=2.0,
            )
        except grpc.aio.AioRpcError as err:
            log.info("broker did not take the drain request: %s", err.code().name)
            return False
        return True

    def _on_unhealthy(self, reason: str) -> None:
        """The rig can take no work (``AttemptRunner.on_unhealthy``: e.g. its state
        directory is full): have the broker place nothing more here. Running attempts go
        on; the agent itself does not drain (a restart brings the worker back ONLINE)."""
        task = asyncio.create_task(self._drain_on_broker(reason), name="unhealthy")
        self._pending_tasks.add(task)
        task.add_done_callback(self._pending_tasks.discard)

    async def _drain_on_broker(self, reason: str) -> None:
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        while not self._stopping.is_set():
            if await self._ask_broker_to_drain():
                log.warning("rig unhealthy (%s): the broker places no more work here", reason)
                return
            await self._sleep_or_stop(backoff.next_delay())

    # --- registration -------------------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._credential}"),)

    def _gpu_infos(self) -> list[ws.GpuInfo]:
        assert self.backend is not None
        price = self.config.price_micros_per_gpu_hour
        return [
            ws.GpuInfo(
                index=g.index,
                uuid=g.uuid,
                model=g.model,
                vram_mb=g.vram_mb,
                power_limit_watts=g.power_limit_watts,
                price_micros_per_gpu_hour=g.default_price_micros_per_gpu_hour
                if price is None
                else price,
                pcie_link_width=g.pcie_link_width,
            )
            for g in self.backend.gpus()
        ]

    async def _register(self, *, first: bool = False) -> None:
        """RegisterWorker until it works (backoff), keeping the saved worker name."""
        async with self._register_lock:
            recent = time.monotonic() - self._registered_at < self.heartbeat_interval_s
            if not first and self._registered.is_set() and recent:
                return  # another loop registered again just now
            assert self._stub is not None and self._identity is not None
            cfg = self.config
            backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
            request = ws.RegisterWorkerRequest(
                enrollment_token=cfg.enrollment_token,
                hostname=cfg.hostname,
                agent_version=cfg.agent_version,
                gpus=self._gpu_infos(),
                worker=self.worker or self._identity.worker,
                metrics_address=self.metrics_address,
            )
            while not self._stopping.is_set():
                sent_at = time.monotonic()
                try:
                    resp = await self._stub.RegisterWorker(request, timeout=10.0)
                    break
                except grpc.aio.AioRpcError as err:
                    if err.code() in _FATAL_AT_REGISTRATION:
                        raise AgentError(
                            f"the broker refused registration: {err.details()}"
                        ) from err
                    delay = backoff.next_delay()
                    log.warning("cannot register (%s); retrying in %.1f s", err.code().name, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
            else:
                return
            self.worker, self._credential = resp.worker, resp.credential
            self.lease_ttl_s = float(resp.lease_ttl_seconds or cfg.lease_ttl_s)
            self.heartbeat_interval_s = effective_heartbeat_s(
                cfg, float(resp.heartbeat_interval_seconds), self.lease_ttl_s
            )
            self._identity = Identity(self._identity.rig_id, cfg.broker_address, *resp_ids(resp))
            save_identity(cfg.state_dir, self._identity)
            self.lease.ttl_s = self.lease_ttl_s
            self.lease.renewed(sent_at)
            self._write_fence()
            self._registered_at = time.monotonic()
            self._registered.set()
            if self.lease.lead_s < self.lease.stop_lead_s:
                log.warning(
                    "the broker's lease TTL of %.0f s leaves %.1f s to stop jobs when it is "
                    "unreachable, under cancel_grace_s + %.1f s: a job may briefly run twice",
                    self.lease_ttl_s,
                    self.lease.lead_s,
                    STOP_MARGIN_S,
                )
            log.info(
                "registered as %s (%d GPUs, lease %.0f s, heartbeat every %.1f s)",
                self.worker,
                len(request.gpus),
                self.lease_ttl_s,
                self.heartbeat_interval_s,
            )

    async def _on_auth_error(self, err: grpc.aio.AioRpcError) -> None:
        log.warning("broker no longer accepts this worker (%s): registering again", err.code().name)
        self._registered_at = float("-inf")
        await self._register()

    # --- loops --------------------------------------------------------------------------

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _heartbeat_loop(self) -> None:
        assert self._stub is not None and self.runner is not None
        status_wanted, status_sent = True, None
        while True:
            t0 = time.monotonic()
            self._fence_if_due(t0)  # e.g. the process was frozen: before anything is sent
            request = ws.HeartbeatRequest(worker=self.worker)
            # Full status only when it changed or the broker asked (it restarted, or this
            # is a new registration): most heartbeats stay a few bytes.
            held = self.runner.environments.held() if self.runner.environments else []
            if status_wanted or held != status_sent:
                request.status.environments.extend(held)
            try:
                response = await self._stub.Heartbeat(
                    request,
                    metadata=self._metadata(),
                    timeout=max(1.0, self.heartbeat_interval_s),
                )
                if request.HasField("status"):
                    status_sent = held
                status_wanted = response.status_wanted
                self.last_heartbeat_rtt_s = time.monotonic() - t0
                if self.metrics is not None:
                    self.metrics.heartbeat_rtt.observe(self.last_heartbeat_rtt_s)
                self._on_heartbeat_answered(t0)
            except grpc.aio.AioRpcError as err:
                if err.code() in _REREGISTER:
                    await self._on_auth_error(err)
                    continue
                self._on_heartbeat_failed(err)
            await asyncio.sleep(max(0.0, self.heartbeat_interval_s - (time.monotonic() - t0)))

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

    def _on_heartbeat_answered(self, sent_at: float) -> None:
        outage = self.lease.renewed(sent_at)
        self._write_fence()
        if outage is not None:
            log.info("broker reachable again (no heartbeat answered for %.1f s)", outage)
        if self._resync and not self._fenced.intersection(self.runner.runs if self.runner else ()):
            # Attempts were stopped or not started while the lease was in doubt: ask the
            # broker again what this rig runs (a new stream begins with a Reconcile).
            self._resync = False
            self._fenced.clear()
            self._reset_stream("the lease is renewed: reconcile")

    def _on_heartbeat_failed(self, err: grpc.aio.AioRpcError) -> None:
        now = time.monotonic()
        refused = is_refusal(err.details())
        was_down = self.lease.broker_down
        first = self.lease.failed(now, refused=refused)
        if refused != was_down:
            self._write_fence()  # a refusing broker (not running) extends it by the grace
        if first:
            runs = len(self.runner.runs) if self.runner else 0
            log.warning(
                "broker unreachable (heartbeat %s%s): %d attempt(s) keep running, until %.1f s "
                "from now unless it answers",
                err.code().name,
                ": connection refused" if refused else "",
                runs,
                self.lease.stop_at - now,
            )
            # A half-open stream would hide the outage until keepalive finds it.
            self._reset_stream(f"heartbeat {err.code().name}")
        elif refused != was_down:
            log.warning(
                "broker %s: attempts are stopped %.1f s from now unless it answers",
                "refuses connections (not running)" if refused else "unreachable again",
                self.lease.stop_at - now,
            )

    async def _lease_loop(self) -> None:
        """Stop the running attempts when the lease runs out (``Lease.stop_at``)."""
        while True:
            now = time.monotonic()
            self._fence_if_due(now)
            await asyncio.sleep(min(0.25, max(0.02, self.lease.stop_at - now)))

    def _fence_if_due(self, now: float) -> None:
        runner = self.runner
        if runner is None or not self.lease.must_stop(now):
            return
        keys = [key for key, run in runner.runs.items() if not run.stop_reason]
        if not keys:
            return
        log.warning(
            "no heartbeat answered for %.1f s (lease TTL %.0f s): stopping %d attempt(s) %s",
            now - self.lease.renewed_at,
            self.lease.ttl_s,
            len(keys),
            "after the lease grace (the broker refuses connections)"
            if self.lease.broker_down
            else "before the broker may requeue them",
        )
        self._fenced.update(keys)
        self._resync = True
        for key in keys:
            runner.stop(key, "lease lost: the broker was unreachable", report=False)

    def _reset_stream(self, why: str) -> None:
        """Make the instruction stream reconnect (its loop reads the cancellation as that)."""
        call = self._stream_call
        if call is not None and not call.done():
            self._stream_reset = why
            call.cancel()

    async def _stream_loop(self) -> None:
        assert self._stub is not None and self.runner is not None
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        while True:
            call = self._stub.StreamInstructions(
                ws.StreamInstructionsRequest(worker=self.worker), metadata=self._metadata()
            )
            self._stream_call, self._stream_reset = call, ""
            try:
                async for instruction in call:
                    backoff.reset()
                    self._on_instruction(instruction)
                log.info("the broker ended the instruction stream; reconnecting")
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError out of a call that was cancelled, here by
                # _reset_stream. Only the agent stopping (this task cancelled) ends the loop.
                if stopping():
                    raise
                log.info("instruction stream reset (%s); reconnecting", self._stream_reset)
            except grpc.aio.AioRpcError as err:
                if err.code() in _REREGISTER:
                    await self._on_auth_error(err)
                else:
                    log.info(
                        "instruction stream broke (%s: %s); reconnecting",
                        err.code().name,
                        err.details(),
                    )
            finally:
                call.cancel()
                self._stream_call = None
            await asyncio.sleep(backoff.next_delay())

    def _on_instruction(self, instruction: ws.Instruction) -> None:
        runner = self.runner
        assert runner is not None
        kind = instruction.WhichOneof("kind")
        if kind == "reconcile":
            wanted = {(a.job, a.attempt): a for a in instruction.reconcile.assignments}
            for key in list(runner.runs):
                if key not in wanted:
                    runner.stop(key, "not in the broker's reconcile", report=True)
            for key in list(self._pending):
                if key not in wanted:
                    self._pending_stops[key] = "not in the broker's reconcile"
            for key, assignment in wanted.items():
                if key not in runner.runs and key not in self._reported_finished:
                    self._start_attempt(assignment)
            log.info("reconciled: %d attempt(s) to run", len(wanted))
        elif kind == "assignment":
            a = instruction.assignment
            if (a.job, a.attempt) not in self._reported_finished:
                self._start_attempt(a)
        elif kind == "cancellation":
            c = instruction.cancellation
            key = (c.job, c.attempt)
            if key in self._pending:
                self._pending_stops[key] = f"cancelled: {c.reason}"
            else:
                runner.stop(key, f"cancelled: {c.reason}", report=True)

    def _start_attempt(self, assignment: ws.Assignment) -> None:
        """Start an attempt, after stopping the miners on its GPUs when any run there."""
        runner, mining = self.runner, self.mining
        assert runner is not None
        key = (assignment.job, assignment.attempt)
        if key in runner.runs or key in self._pending:
            return
        if self.lease.must_stop(time.monotonic()):
            # It would be stopped at once; the broker is asked again once it answers.
            log.info("%s attempt %d not started: no heartbeat answered lately", *key)
            self._resync = True
            return
        indices = list(assignment.gpu_indices)
        if mining is None or not mining.mining_on(indices) or not runner.accepting:
            runner.start(assignment)
            return
        self._pending[key] = assignment  # its GPUs count as busy: no miner starts there again
        self._pending_stops.pop(key, None)
        task = asyncio.create_task(self._start_after_miners(assignment), name=f"{key[0]}#{key[1]}")
        self._pending_tasks.add(task)
        task.add_done_callback(self._pending_tasks.discard)

    async def _start_after_miners(self, assignment: ws.Assignment) -> None:
        assert self.mining is not None and self.runner is not None
        key = (assignment.job, assignment.attempt)
        try:
            await self.mining.release(list(assignment.gpu_indices))
        finally:
            self._pending.pop(key, None)
        reason = self._pending_stops.pop(key, None)
        if reason is None:
            self.runner.start(assignment)
            return
        # Stopped before it started: say so like a cancelled attempt (no energy: it held
        # the GPUs only while the miners stopped, and that was mining).
        log.info("%s attempt %d dropped before it started: %s", key[0], key[1], reason)
        self.outbox.finished(key, -signal.SIGTERM, 0, reason, time.time())
        self._wake.set()

    def _busy_gpus(self) -> set[int]:
        """GPUs held by an attempt, or by an assignment waiting for a miner to stop."""
        busy: set[int] = set()
        if self.runner is not None:
            for run in list(self.runner.runs.values()):
                busy.update(run.assignment.gpu_indices)
        for assignment in self._pending.values():
            busy.update(assignment.gpu_indices)
        return busy

    async def _reporter_loop(self) -> None:
        assert self._stub is not None and self.runner is not None
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        while True:
            if self.outbox.empty():
                self._wake.clear()
                await self._wake.wait()
            if not self.outbox.has_urgent():
                await asyncio.sleep(self.config.report_flush_s)
            batch = self.outbox.batch()
            if not batch:
                continue
            try:
                resp = await self._stub.ReportJobEvents(
                    ws.ReportJobEventsRequest(worker=self.worker, events=batch),
                    metadata=self._metadata(),
                    timeout=10.0,
                )
            except grpc.aio.AioRpcError as err:
                if err.code() in _REREGISTER:
                    await self._on_auth_error(err)
                elif err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    log.error("broker rejected %d event(s): %s; dropped", len(batch), err.details())
                    self.outbox.ack()
                    continue
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self.outbox.ack()
            for event in batch:
                if event.WhichOneof("kind") == "finished":
                    key = (event.job, event.attempt)
                    self._reported_finished[key] = None
                    self.outbox.release(key)
            while len(self._reported_finished) > 10_000:
                self._reported_finished.popitem(last=False)
            for c in resp.stale:
                self.runner.stop((c.job, c.attempt), f"stale: {c.reason}", report=True)

    async def _meter_loop(self) -> None:
        assert self.meter is not None and self.runner is not None
        cfg = self.config
        next_progress = time.monotonic() + cfg.progress_interval_s
        while True:
            await asyncio.sleep(min(cfg.energy_sample_interval_s, cfg.progress_interval_s))
            self.meter.sample()
            if time.monotonic() >= next_progress:
                next_progress += cfg.progress_interval_s
                self.runner.report_progress()

    async def _mining_loop(self) -> None:
        assert self.mining is not None
        interval = self.mining.config.check_interval_s
        while True:
            if self.state != "draining":  # a rig going down starts no new miners
                self.mining.tick(self._busy_gpus())
            await asyncio.sleep(interval)

    # --- helpers ------------------------------------------------------------------------

    async def _download(self, sha256: str):  # type: ignore[no-untyped-def]
        """Stream an artifact's bytes from the broker (used by the AttemptRunner)."""
        from rigshift.v1 import artifact_service_pb2, artifact_service_pb2_grpc

        assert self._channel is not None
        stub = artifact_service_pb2_grpc.ArtifactServiceStub(self._channel)
        call = stub.DownloadArtifact(
            artifact_service_pb2.DownloadArtifactRequest(sha256=sha256),
            metadata=self._metadata(),
            timeout=600.0,
        )
        async for chunk in call:
            yield chunk.data

    async def _upload_output(self, sha256: str, data: bytes) -> None:
        """Store an attempt's output archive (purpose OUTPUT: the broker's output limit)."""
        from rigshift.v1 import artifact_service_pb2

        await self._upload(sha256, data, purpose=artifact_service_pb2.OUTPUT)

    async def _upload(self, sha256: str, data: bytes, purpose: int = 0) -> None:
        """Store an archive (a checkpoint, an output) in the broker's artifact store,
        1 MiB per chunk."""
        from rigshift.v1 import artifact_service_pb2, artifact_service_pb2_grpc

        assert self._channel is not None
        chunk = 1 << 20

        def chunks():  # type: ignore[no-untyped-def]
            for start in range(0, max(1, len(data)), chunk):
                request = artifact_service_pb2.UploadArtifactRequest(
                    data=data[start : start + chunk]
                )
                if start == 0:
                    request.sha256, request.size_bytes = sha256, len(data)
                    request.purpose = purpose
                yield request

        stub = artifact_service_pb2_grpc.ArtifactServiceStub(self._channel)
        await stub.UploadArtifact(chunks(), metadata=self._metadata(), timeout=300.0)


def _job_uid(isolation: Any) -> int | None:
    """The uid jobs run as when the executor's isolation changes it, else None."""
    return getattr(isolation, "uid", None) if isolation is not None else None


def resp_ids(resp: ws.RegisterWorkerResponse) -> tuple[str, str]:
    """(worker name, credential) of a registration."""
    return resp.worker, resp.credential
