"""The agent's connection to the broker: register, the session (lease renewals and
instructions on one stream), reports.

:class:`BrokerSession` is the I/O half of the agent: it holds the channel, the worker's
name and credential, and turns what the broker says into the events of the agent's
state machine (``state_machine.py``), handed to ``handle``; it decides nothing itself
beyond retrying. Its three loops run under the agent's ``supervise``::

    heartbeat   a lease renewal every interval (a LeaseCheck first, so a frozen process
                stops its attempts before it sends anything): a message on the Session
                stream, or a Heartbeat call against a broker without Session;
                answered -> HeartbeatAnswered, failed or unanswered within the interval
                -> HeartbeatFailed; UNAUTHENTICATED/NOT_FOUND -> register again
    stream      Session (issue 17): the first message renews and names the worker; the
                broker sends a Reconcile, then Assignment / Cancellation / Reinstate
                (-> Reconcile, Assigned, Cancelled, ReinstateAsked) and a lease_renewed
                per renewal, in order (``session_link.py``); Curtail and Reconcile's
                curtail -> ``on_curtail`` (the miners: ``mining.py``). A broker without
                Session answers UNIMPLEMENTED: StreamInstructions then, and Session is
                tried again when that stream ends. Reconnects with backoff and full
                jitter whenever the stream breaks or is reset (reset_stream), at once
                when a renewal is due
    reporter    ReportJobEvents from the Outbox: starts and finishes at once, output
                batched; a failed batch is retried unchanged; acknowledged finishes ->
                FinishedReported, ``stale`` attempts -> Stale
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from rigshift.v1 import artifact_service_pb2 as art
from rigshift.v1 import farm_pb2
from rigshift.v1 import worker_service_pb2 as ws
from rigshift.v1 import worker_service_pb2_grpc as wsg
from worker_agent.backoff import Backoff
from worker_agent.broker_calls import (
    ask_broker_to_drain,
    download_artifact,
    report_gpu_health,
    upload_artifact,
)
from worker_agent.channel import broker_channel
from worker_agent.config import AgentConfig, effective_heartbeat_s
from worker_agent.identity import Identity, save_identity
from worker_agent.lease import is_refusal
from worker_agent.outbox import AttemptKey, Outbox
from worker_agent.session_link import SessionBroken, SessionLink
from worker_agent.state_machine import (
    Assigned,
    Cancelled,
    Event,
    FinishedReported,
    HeartbeatAnswered,
    HeartbeatFailed,
    LeaseCheck,
    Reconcile,
    Registered,
    ReinstateAsked,
    Stale,
)
from worker_agent.supervise import stopping

__all__ = ["AgentError", "BrokerSession"]

Status = tuple[list[str], list[str]] | None
"""The rig's status as sent with a renewal (environments, images), or None: not sent."""

log = logging.getLogger("rigshift.agent")

_REREGISTER = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
}
_REREGISTER_NAMES = {code.name for code in _REREGISTER}
_FATAL_AT_REGISTRATION = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
}


class AgentError(Exception):
    """The agent cannot go on (e.g. the broker refused the enrollment token)."""


class BrokerSession:
    """One agent's session with the broker (see the module docstring).

    ``handle`` takes the state machine's events; ``mining_gpus`` says which GPUs a miner
    holds now (it goes on Reconcile and Assigned); ``environments`` lists the Python
    environments the rig holds (the heartbeat's status); ``on_rtt`` gets each answered
    heartbeat's round trip; ``stopping`` is set when the agent shuts down.
    """

    def __init__(
        self,
        config: AgentConfig,
        outbox: Outbox,
        wake: asyncio.Event,
        stopping: asyncio.Event,
        *,
        handle: Callable[[Event], None],
        mining_gpus: Callable[[], frozenset[int]],
        environments: Callable[[], list[str]],
        gpu_infos: Callable[[], list[ws.GpuInfo]],
        on_rtt: Callable[[float], None],
        images: Callable[[], list[str]] = list,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.wake = wake
        self.stopping = stopping
        self.handle = handle
        self.mining_gpus = mining_gpus
        self.environments = environments
        self.images = images
        self.container_runtime: tuple[str, str] | None = None
        """``(name, version)`` of the rig's container runtime, told at registration."""
        self.host: farm_pb2.HostInfo | None = None
        """The self-test's host figures, told at registration."""
        self.gpu_infos = gpu_infos
        self.on_rtt = on_rtt
        self.on_curtail: Callable[[bool, float, str], None] = lambda active, end, why: None
        """Gets each curtailment state (``Instruction.curtail``, ``Reconcile.curtail``):
        active, end time (wall seconds, 0: none given), reason."""
        self.worker = ""
        self.credential = ""
        self.identity: Identity | None = None
        self.metrics_address = ""
        self.heartbeat_interval_s = config.heartbeat_interval_s
        self.lease_ttl_s = config.lease_ttl_s
        self.last_heartbeat_rtt_s = 0.0
        self.channel: grpc.aio.Channel | None = None
        self.registered = asyncio.Event()
        self._stub: wsg.WorkerServiceStub | None = None
        self._register_lock = asyncio.Lock()
        self._registered_at = float("-inf")
        self._stream_call: grpc.aio.Call | None = None
        self.protocol = "session" if config.session_protocol else "unary"
        """How the lease is renewed: ``session`` (Session) or ``unary`` (Heartbeat calls,
        against a broker without Session)."""
        self._link: SessionLink | None = None
        self._link_open = asyncio.Event()
        self._session_error: SessionBroken | None = None
        self._reconnect_now = asyncio.Event()
        self._status_wanted = True
        self._status_sent: tuple[list[str], list[str]] | None = None
        self._stream_reset = ""  # why the agent cancelled the stream call

    # --- connection -------------------------------------------------------------------

    async def open(self, identity: Identity) -> None:
        """Dial the broker and register (retrying until it works or the agent stops)."""
        self.identity = identity
        self.channel = broker_channel(self.config)
        self._stub = wsg.WorkerServiceStub(self.channel)
        await self.register(first=True)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata: this worker's credential."""
        return (("authorization", f"Bearer {self.credential}"),)

    async def register(self, *, first: bool = False) -> None:
        """RegisterWorker until it works (backoff), keeping the saved worker name."""
        async with self._register_lock:
            recent = time.monotonic() - self._registered_at < self.heartbeat_interval_s
            if not first and self.registered.is_set() and recent:
                return  # another loop registered again just now
            assert self._stub is not None and self.identity is not None
            cfg = self.config
            backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
            request = ws.RegisterWorkerRequest(
                enrollment_token=cfg.enrollment_token,
                hostname=cfg.hostname,
                agent_version=cfg.agent_version,
                gpus=self.gpu_infos(),
                worker=self.worker or self.identity.worker,
                metrics_address=self.metrics_address,
            )
            if self.host is not None:
                request.host.CopyFrom(self.host)
            if self.container_runtime is not None:
                name, version = self.container_runtime
                request.container_runtime.name, request.container_runtime.version = name, version
            while not self.stopping.is_set():
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
                        await asyncio.wait_for(self.stopping.wait(), delay)
            else:
                return
            self.worker, self.credential = resp.worker, resp.credential
            self.lease_ttl_s = float(resp.lease_ttl_seconds or cfg.lease_ttl_s)
            self.heartbeat_interval_s = effective_heartbeat_s(
                cfg, float(resp.heartbeat_interval_seconds), self.lease_ttl_s
            )
            self.identity = Identity(
                self.identity.rig_id, cfg.broker_address, resp.worker, resp.credential
            )
            save_identity(cfg.state_dir, self.identity)
            self.handle(Registered(sent_at, self.lease_ttl_s))
            self._registered_at = time.monotonic()
            self.registered.set()
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
        await self.register()

    # --- loops ------------------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        """Renew the lease every interval: on the Session stream (a message, not a call),
        or with unary Heartbeat calls against a broker without Session."""
        assert self._stub is not None
        while True:
            t0 = time.monotonic()
            self.handle(LeaseCheck(t0))  # e.g. the process was frozen: before anything is sent
            timeout = max(1.0, self.heartbeat_interval_s)
            try:
                if self.protocol == "unary":
                    await self._heartbeat_unary(t0, timeout)
                else:
                    await self._renew_on_session(t0, t0 + timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() in _REREGISTER:
                    await self._on_auth_error(err)
                    continue
                refused = is_refusal(err.details())
                self.handle(HeartbeatFailed(time.monotonic(), err.code().name, refused))
            except SessionBroken as err:
                if err.code not in _REREGISTER_NAMES:  # else the stream loop registers again
                    self.handle(
                        HeartbeatFailed(time.monotonic(), err.code, is_refusal(err.details))
                    )
            await asyncio.sleep(max(0.0, self.heartbeat_interval_s - (time.monotonic() - t0)))

    def _status_to_send(self) -> tuple[list[str], list[str]] | None:
        """The rig's status when it changed or the broker asked for it (it restarted, or
        this is a new registration), else None: most renewals stay a few bytes."""
        held = (self.environments(), self.images())
        return held if self._status_wanted or held != self._status_sent else None

    def _answered(
        self, sent_at: float, status: tuple[list[str], list[str]] | None, status_wanted: bool
    ) -> None:
        """A renewal sent at ``sent_at`` (carrying ``status``) was answered."""
        if status is not None:
            self._status_sent = status
        self._status_wanted = status_wanted
        self.last_heartbeat_rtt_s = time.monotonic() - sent_at
        self.on_rtt(self.last_heartbeat_rtt_s)
        self.handle(HeartbeatAnswered(sent_at))

    async def _heartbeat_unary(self, t0: float, timeout: float) -> None:
        assert self._stub is not None
        status = self._status_to_send()
        request = ws.HeartbeatRequest(worker=self.worker)
        if status is not None:
            request.status.environments.extend(status[0])
            request.status.images.extend(status[1])
        response = await self._stub.Heartbeat(request, metadata=self.metadata(), timeout=timeout)
        self._answered(t0, status, response.status_wanted)

    def _session_request(self, worker: str = "") -> tuple[ws.SessionRequest, Status]:
        status = self._status_to_send()
        request = ws.SessionRequest(worker=worker)
        if status is not None:
            request.status.environments.extend(status[0])
            request.status.images.extend(status[1])
        return request, status

    async def _renew_on_session(self, t0: float, deadline: float) -> None:
        """One renewal on the open session, answered by ``deadline`` (the stream loop takes
        the answer: ``_answered``); else SessionBroken. Waits for a session being opened
        (and wakes the stream loop's reconnect backoff: renewals must not wait for it)."""
        while True:
            if self.protocol == "unary":  # the broker turned out to have no Session
                await self._heartbeat_unary(t0, max(0.5, deadline - time.monotonic()))
                return
            remaining = deadline - time.monotonic()
            link = self._link
            if link is None or link.closed:
                if remaining <= 0:
                    raise self._session_error or SessionBroken("DEADLINE_EXCEEDED", "no session")
                # Asked again every half second: a reconnect that failed meanwhile (the
                # broker was still away) waits out its backoff only until the next ask, so
                # the lease is renewed soon after the broker is back.
                self._reconnect_now.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._link_open.wait(), min(remaining, 0.5))
                continue
            request, status = self._session_request()
            renewal = link.renew(request, t0, status)
            try:
                await asyncio.wait_for(asyncio.shield(renewal.answer), max(0.0, remaining))
                return
            except TimeoutError:
                # Still waiting on the stream: a late answer renews from t0 all the same.
                raise SessionBroken("DEADLINE_EXCEEDED", "renewal not answered in time") from None
            except SessionBroken as err:
                if not err.retry or time.monotonic() >= deadline:
                    raise

    def reset_stream(self, why: str) -> None:
        """Make the instruction stream (the session) reconnect (its loop reads the
        cancellation as that)."""
        call = self._stream_call
        if call is not None and not call.done():
            self._stream_reset = why
            call.cancel()

    async def stream_loop(self) -> None:
        """Hold the session open (the instructions and the renewals' answers); against a
        broker without Session (UNIMPLEMENTED), StreamInstructions, trying Session again
        whenever that stream ends (the broker may have been upgraded)."""
        assert self._stub is not None
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        while True:
            if not self.config.session_protocol:
                await self._instructions_once(backoff)
            elif await self._session_once(backoff):
                await self._instructions_once(backoff)  # the fallback, at once
            self._reconnect_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reconnect_now.wait(), backoff.next_delay())

    async def _session_once(self, backoff: Backoff) -> bool:
        """One Session call until it ends; True when the broker has no Session."""
        assert self._stub is not None
        link = SessionLink()
        request, status = self._session_request(self.worker)
        link.renew(request, time.monotonic(), status)  # the first message renews too
        # Requests go out through call.write() from a task of our own, not a request
        # iterator: grpc.aio consumes an iterator in a task of its own that can still touch
        # the call after it was cancelled at shutdown, which crashed the process (SIGSEGV)
        # when the agent stopped right after opening a session.
        call = self._stub.Session(metadata=self.metadata())
        writer = asyncio.create_task(_write_requests(link, call), name="session-writer")
        self._stream_call, self._stream_reset = call, ""
        self._link = link
        self._link_open.set()
        broken = SessionBroken("UNAVAILABLE", "the broker ended the session", retry=True)
        auth_error: grpc.aio.AioRpcError | None = None
        first = True
        try:
            async for instruction in call:
                if first:  # the operator's way to tell which protocol the agent speaks
                    log.info("session open: lease renewals ride the stream")
                    first = False
                self.protocol = "session"
                self._session_error = None
                backoff.reset()
                if instruction.WhichOneof("kind") == "lease_renewed":
                    renewal = link.answered(instruction.lease_renewed)
                    if renewal is not None:
                        self._answered(
                            renewal.sent_at, renewal.status, instruction.lease_renewed.status_wanted
                        )
                else:
                    self._on_instruction(instruction)
            log.info("the broker ended the session; reconnecting")
        except asyncio.CancelledError:
            if stopping():
                raise
            log.info("session reset (%s); reconnecting", self._stream_reset)
            broken = SessionBroken("CANCELLED", self._stream_reset, retry=True)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("the broker has no Session: heartbeats and StreamInstructions instead")
                self.protocol = "unary"
                broken = SessionBroken("UNIMPLEMENTED", "no Session", retry=True)
            else:
                broken = SessionBroken(err.code().name, err.details() or "")
                self._session_error = broken
                if err.code() in _REREGISTER:
                    auth_error = err
                else:
                    log.info("session broke (%s: %s); reconnecting", broken.code, broken.details)
        finally:
            link.close(broken)
            self._link = None
            self._link_open.clear()
            # Cancel the call, not the writer: a write cancelled halfway through its batch
            # left grpc.aio's core op dangling (SIGSEGV, or a shutdown that never ended).
            # The cancelled call fails the writer's write, or the writer ends on the closed
            # link; either way it finishes by itself.
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(_finished(writer))
            self._stream_call = None
            if self.protocol == "unary":
                self._link_open.set()  # a renewal waiting for a session goes unary now
        if auth_error is not None:
            await self._on_auth_error(auth_error)
        return broken.code == "UNIMPLEMENTED"

    async def _instructions_once(self, backoff: Backoff) -> None:
        """One StreamInstructions call until it ends (a broker without Session)."""
        assert self._stub is not None
        call = self._stub.StreamInstructions(
            ws.StreamInstructionsRequest(worker=self.worker), metadata=self.metadata()
        )
        self._stream_call, self._stream_reset = call, ""
        try:
            async for instruction in call:
                backoff.reset()
                self._on_instruction(instruction)
            log.info("the broker ended the instruction stream; reconnecting")
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError out of a call that was cancelled, here by
            # reset_stream. Only the agent stopping (this task cancelled) ends the loop.
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

    def _on_instruction(self, instruction: ws.Instruction) -> None:
        kind = instruction.WhichOneof("kind")
        if kind in ("reconcile", "curtail"):  # a Reconcile without one: no window is on
            c = getattr(instruction, kind) if kind == "curtail" else instruction.reconcile.curtail
            end = c.end_time.ToNanoseconds() / 1e9 if c.HasField("end_time") else 0.0
            self.on_curtail(c.active, end, c.reason)
        if kind == "reconcile":
            assignments = tuple(instruction.reconcile.assignments)
            self.handle(Reconcile(assignments, self.mining_gpus(), time.monotonic()))
        elif kind == "assignment":
            self.handle(Assigned(instruction.assignment, self.mining_gpus(), time.monotonic()))
        elif kind == "cancellation":
            c = instruction.cancellation
            self.handle(Cancelled((c.job, c.attempt), c.reason))
        elif kind == "reinstate":
            r = instruction.reinstate
            self.handle(ReinstateAsked(r.gpu_index, r.requested_by, time.monotonic()))

    async def reporter_loop(self) -> None:
        assert self._stub is not None
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        while True:
            if self.outbox.empty():
                self.wake.clear()
                await self.wake.wait()
            if not self.outbox.has_urgent():
                await asyncio.sleep(self.config.report_flush_s)
            batch = self.outbox.batch()
            if not batch:
                continue
            try:
                resp = await self._stub.ReportJobEvents(
                    ws.ReportJobEventsRequest(worker=self.worker, events=batch),
                    metadata=self.metadata(),
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
            finished: list[AttemptKey] = []
            for event in batch:
                if event.WhichOneof("kind") == "finished":
                    finished.append((event.job, event.attempt))
                    self.outbox.release(finished[-1])
            self.handle(FinishedReported(tuple(finished)))
            for c in resp.stale:
                self.handle(Stale((c.job, c.attempt), c.reason))

    # --- calls the rest of the agent makes --------------------------------------------

    def download(self, sha256: str) -> AsyncIterator[bytes]:
        """Stream an artifact's bytes from the broker (the AttemptRunner's downloader)."""
        assert self.channel is not None
        return download_artifact(self.channel, self.metadata(), sha256)

    async def upload(self, sha256: str, data: bytes, purpose: int = 0) -> None:
        """Store an archive (a checkpoint, an output) in the broker's artifact store."""
        assert self.channel is not None
        await upload_artifact(self.channel, self.metadata(), sha256, data, purpose)

    async def upload_output(self, sha256: str, data: bytes) -> None:
        """Store an attempt's output archive (purpose OUTPUT: the broker's output limit)."""
        await self.upload(sha256, data, purpose=art.OUTPUT)

    async def report_gpu_health(self, gpus: list[ws.GpuHealth]) -> bool:
        """WorkerService.ReportGpuHealth once: whether the broker took it."""
        if not self.worker or self.channel is None:
            return False
        return await report_gpu_health(self.channel, self.metadata(), self.worker, gpus)

    async def ask_to_drain(self) -> bool:
        """Best effort: FarmService.DrainWorker so the broker stops placing work here;
        whether the broker took it."""
        if not self.worker or self.channel is None:
            return False
        return await ask_broker_to_drain(self.channel, self.metadata(), self.worker)

    async def drain_until_taken(self, reason: str) -> None:
        """:meth:`ask_to_drain` with backoff until the broker takes it (an unhealthy rig)."""
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        while not self.stopping.is_set():
            if await self.ask_to_drain():
                log.warning("rig unhealthy (%s): the broker places no more work here", reason)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff.next_delay())


async def _write_requests(link: SessionLink, call: grpc.aio.StreamStreamCall) -> None:
    """Send the link's requests on the call in order, until the link or the call ends."""
    try:
        async for request in link.requests():
            await call.write(request)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return  # the call ended: its reader sees why


async def _finished(task: asyncio.Task[None]) -> None:
    """Wait until ``task`` is done, whatever it raised."""
    with contextlib.suppress(BaseException):
        await task
