"""rigshift.v1.WorkerService: the agent's session (register, heartbeat, the instruction
stream, and the reports of its attempts turned into core events)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace

import grpc

from broker import validation as v
from broker.api.boundary import abort_internal, abort_with, well_formed
from broker.api.common import admit, call_metadata, streaming, unary
from broker.artifacts import ArtifactStore
from broker.auth import current
from broker.convert import measurement_from_pb, power_curve_from_pb, timestamp
from broker.errors import (
    BrokerError,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from broker.events import (
    AttemptCheckpointed,
    AttemptFinished,
    AttemptLog,
    AttemptOutputReported,
    AttemptPreparing,
    AttemptProgress,
    AttemptReport,
    AttemptStarted,
    Cancel,
    GpuHealth,
    GpuHealthReported,
    Heartbeat,
    WorkerRegistered,
)
from broker.model import GpuInfo, SetupCause
from broker.service import BrokerService, cancellation, sha256_hex
from rigshift.v1 import (
    worker_service_pb2,
    worker_service_pb2_grpc,
)

_RUNTIME = re.compile(r"^[A-Za-z0-9_.-]*$")


class WorkerServicer(worker_service_pb2_grpc.WorkerServiceServicer):
    """rigshift.v1.WorkerService: the agent's session."""

    SERVICE = "WorkerService"

    def __init__(self, svc: BrokerService, lease_ttl_s: float, heartbeat_interval_s: float):
        self.svc = svc
        self.lease_ttl_s = lease_ttl_s
        self.heartbeat_interval_s = heartbeat_interval_s

    def _auth(self, worker: str, context: grpc.aio.ServicerContext) -> str:
        worker_id = v.parse_name(worker, "workers", "worker")
        if current().name != worker_id:
            raise PermissionDenied(
                f"this credential does not belong to workers/{worker_id}",
                reason="WRONG_WORKER_CREDENTIAL",
            )
        self.svc.core.worker(worker_id)
        return worker_id

    @unary
    async def RegisterWorker(
        self, request: worker_service_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> worker_service_pb2.RegisterWorkerResponse:
        violations = []
        if not request.enrollment_token:
            violations.append(FieldViolation("enrollment_token", "is required"))
        if not request.hostname.strip() or len(request.hostname) > 253:
            violations.append(FieldViolation("hostname", "must be 1-253 characters"))
        if len(request.agent_version) > 64:
            violations.append(FieldViolation("agent_version", "at most 64 characters"))
        if len(request.metrics_address) > 253:
            violations.append(FieldViolation("metrics_address", "at most 253 characters"))
        runtime = request.container_runtime
        if len(runtime.name) > 64 or not _RUNTIME.match(runtime.name):
            violations.append(
                FieldViolation("container_runtime.name", "at most 64 of letters, digits, `_.-`")
            )
        if len(runtime.version) > 64 or not runtime.version.isprintable():
            violations.append(FieldViolation("container_runtime.version", "at most 64 characters"))
        host = request.host
        for name, value, top in (
            ("host.ram_mb", host.ram_mb, 1 << 40),
            ("host.cpu_cores", host.cpu_cores, 1 << 16),
            ("host.disk_write_mbps", host.disk_write_mbps, 1 << 30),
        ):
            if not 0 <= value <= top:
                violations.append(FieldViolation(name, f"must be 0-{top}"))
        if violations:
            raise InvalidArgument.of(violations)
        gpus = _with_figures(v.check_gpus(list(request.gpus)), request.gpus)
        health = tuple(_health(g.index, g.health) for g in request.gpus if g.HasField("health"))
        farm = self.svc.store.farm_by_token(sha256_hex(request.enrollment_token))
        if farm is None:
            raise Unauthenticated("enrollment token not recognised", reason="BAD_ENROLLMENT_TOKEN")
        worker_id = uuid.uuid4().hex[:12]
        if request.worker:
            wanted = v.parse_name(request.worker, "workers", "worker")
            old = self.svc.core.workers.get(wanted)
            if old is not None and old.farm_id == farm.id:
                worker_id = wanted
        credential = self.svc.new_credential(worker_id)
        await self.svc.apply(
            WorkerRegistered(
                self.svc.clock(),
                worker_id,
                farm.id,
                request.hostname.strip(),
                request.agent_version,
                gpus,
                request.metrics_address,
                runtime.name,
                runtime.version if runtime.name else "",
                host_ram_mb=host.ram_mb,
                cpu_cores=host.cpu_cores,
                disk_write_mbps=host.disk_write_mbps,
                health=health,
            )
        )
        return worker_service_pb2.RegisterWorkerResponse(
            worker=f"workers/{worker_id}",
            credential=credential,
            lease_ttl_seconds=int(self.lease_ttl_s),
            heartbeat_interval_seconds=max(1, int(self.heartbeat_interval_s)),
        )

    @unary
    async def Heartbeat(
        self, request: worker_service_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> worker_service_pb2.HeartbeatResponse:
        worker_id = self._auth(request.worker, context)
        environments = None
        if request.HasField("status"):
            environments = tuple(_sha_list(request.status.environments, "status.environments"))
            environments += tuple(_image_list(request.status.images))
        await self.svc.apply(Heartbeat(self.svc.clock(), worker_id, environments))
        worker = self.svc.core.workers[worker_id]
        return worker_service_pb2.HeartbeatResponse(
            lease_expire_time=timestamp(worker.lease_expires_at),
            status_wanted=worker.environments is None,
        )

    @streaming
    async def StreamInstructions(
        self,
        request: worker_service_pb2.StreamInstructionsRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[worker_service_pb2.Instruction]:
        worker_id = self._auth(request.worker, context)
        queue = self.svc.open_stream(worker_id)
        try:
            while True:
                instruction = await queue.get()
                if instruction is None:
                    return
                yield instruction
        finally:
            self.svc.close_stream(worker_id, queue)

    async def Session(
        self,
        request_iterator: AsyncIterator[worker_service_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """The agent's session on one bidirectional stream (issue 17): every request renews
        the lease and is answered with ``lease_renewed``, between the instructions
        (a ``Reconcile`` first, as StreamInstructions). Errors end the stream with the
        status of the boundary, as the other methods' do."""
        try:
            admit(self, "Session", context)
            first = await context.read()
            if first is grpc.aio.EOF:
                return
            first = well_formed(first)
            if not first.worker:
                raise InvalidArgument.of(
                    [FieldViolation("worker", "is required on the session's first message")]
                )
            worker_id = self._auth(first.worker, context)
            await _Session(self.svc, worker_id, context).serve(first)
        except grpc.aio.AbortError:
            raise
        except BrokerError as err:
            await abort_with(context, err)
        except Exception:
            await abort_internal(context, "Session")

    @unary
    async def ReportJobEvents(
        self, request: worker_service_pb2.ReportJobEventsRequest, context: grpc.aio.ServicerContext
    ) -> worker_service_pb2.ReportJobEventsResponse:
        worker_id = self._auth(request.worker, context)
        if len(request.events) > 1000:
            raise InvalidArgument.of([FieldViolation("events", "at most 1000 per call")])
        now = self.svc.clock()
        last = _last_rig_time(request.events)
        events: list[AttemptReport] = []
        for i, e in enumerate(request.events):
            events.append(_report_event(i, e, worker_id, now, last))
        fresh = [e for e in events if not self.svc.core.is_duplicate(e)]
        cmds = await self.svc.apply(*fresh)
        stale = {}
        for c in cmds:
            if isinstance(c, Cancel) and c.worker_id == worker_id:
                stale[(c.job_id, c.attempt)] = cancellation(c).cancellation
        return worker_service_pb2.ReportJobEventsResponse(
            applied=len(fresh), stale=list(stale.values())
        )

    @unary
    async def ReportGpuHealth(
        self, request: worker_service_pb2.ReportGpuHealthRequest, context: grpc.aio.ServicerContext
    ) -> worker_service_pb2.ReportGpuHealthResponse:
        worker_id = self._auth(request.worker, context)
        if len(request.gpus) > 256:
            raise InvalidArgument.of([FieldViolation("gpus", "at most 256 GPUs")])
        seen: set[int] = set()
        for i, g in enumerate(request.gpus):
            if g.index in seen:
                raise InvalidArgument.of(
                    [FieldViolation(f"gpus[{i}].index", f"duplicate index {g.index}")]
                )
            seen.add(g.index)
        gpus = tuple(_health(g.index, g) for g in request.gpus)
        await self.svc.apply(GpuHealthReported(self.svc.clock(), worker_id, gpus))
        return worker_service_pb2.ReportGpuHealthResponse()


class _Session:
    """One open Session: a reader task takes the renewals, this task writes what the
    stream carries (instructions and renewal answers, in one queue, so one writer)."""

    def __init__(self, svc: BrokerService, worker_id: str, context: grpc.aio.ServicerContext):
        self.svc = svc
        self.worker_id = worker_id
        self.context = context
        self.metadata = call_metadata(context)
        self.failure: BaseException | None = None
        self.queue: asyncio.Queue[worker_service_pb2.Instruction | None] | None = None

    async def serve(self, first: worker_service_pb2.SessionRequest) -> None:
        """Open the instruction queue (its Reconcile first), renew for ``first``, then
        serve until the agent closes its side, the stream is superseded or fails."""
        self.queue = queue = self.svc.open_stream(self.worker_id)
        reader = asyncio.create_task(self._read(first), name=f"session-{self.worker_id}")
        try:
            while (instruction := await queue.get()) is not None:
                await self.context.write(instruction)
            if self.failure is not None:
                raise self.failure
        finally:
            # Wait for the reader to end before the call does: a reader still iterating a
            # finished call's requests can crash grpc.aio (seen as SIGSEGV at shutdown).
            reader.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(_ended(reader))
            self.svc.close_stream(self.worker_id, queue)

    async def _read(self, request: worker_service_pb2.SessionRequest) -> None:
        try:
            while True:
                self._renew(well_formed(request))
                nxt = await self.context.read()
                if nxt is grpc.aio.EOF:
                    break  # the agent closed the session: end the stream
                request = nxt
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # a bad request: the stream ends with its status
            self.failure = err
        assert self.queue is not None
        self.queue.put_nowait(None)

    def _renew(self, request: worker_service_pb2.SessionRequest) -> None:
        # The credential may have been replaced since the session opened (the worker
        # registered again elsewhere): each renewal checks it, as each Heartbeat call does.
        principal = self.svc.authenticate(self.metadata)
        if principal is None or principal.name != self.worker_id:
            raise PermissionDenied(
                f"this credential does not belong to workers/{self.worker_id}",
                reason="WRONG_WORKER_CREDENTIAL",
            )
        if request.worker and request.worker != f"workers/{self.worker_id}":
            raise InvalidArgument.of(
                [FieldViolation("worker", f"the session belongs to workers/{self.worker_id}")]
            )
        environments = None
        if request.HasField("status"):
            environments = tuple(_sha_list(request.status.environments, "status.environments"))
            environments += tuple(_image_list(request.status.images))
        # A renewal does not suspend this reader (BrokerService.renew): the answer goes on
        # the stream when the renewal took effect, at once unless it had to be written.
        self.svc.renew(self.worker_id, environments, self._answer)

    def _answer(self, err: BaseException | None) -> None:
        assert self.queue is not None
        if err is not None:
            self.failure = err
            self.queue.put_nowait(None)
            return
        worker = self.svc.core.workers.get(self.worker_id)
        if worker is None:
            return
        renewed = worker_service_pb2.LeaseRenewed(
            lease_expire_time=timestamp(worker.lease_expires_at),
            status_wanted=worker.environments is None,
        )
        self.queue.put_nowait(worker_service_pb2.Instruction(lease_renewed=renewed))


def _with_figures(
    gpus: tuple[GpuInfo, ...], messages: Iterable[worker_service_pb2.GpuInfo]
) -> tuple[GpuInfo, ...]:
    """The validated GPUs with what the self-test measured, the PCIe generation, and the
    power curve (issue 16) with whether the agent may set the limit."""
    out = []
    for info, msg in zip(gpus, messages, strict=True):
        figures = measurement_from_pb(msg.measurement) if msg.HasField("measurement") else None
        generation = msg.pcie_generation if 0 <= msg.pcie_generation <= 16 else 0
        out.append(
            replace(
                info,
                pcie_generation=generation,
                measurement=figures,
                power_curve=power_curve_from_pb(msg.power_curve),
                power_limit_settable=msg.power_limit_settable,
            )
        )
    return tuple(out)


def _health(index: int, msg: worker_service_pb2.GpuHealth) -> GpuHealth:
    """GPU ``index``'s health as the agent reported it (the reason cut to 512 characters;
    at registration the GPU's own index counts, whatever the nested message says)."""
    return GpuHealth(
        index=index,
        quarantined=msg.quarantined,
        reason=msg.reason[:512] if msg.quarantined else "",
        since=msg.since.ToNanoseconds() / 1e9 if msg.HasField("since") else None,
        reinstate_required=msg.quarantined and msg.reinstate_required,
        measurement=measurement_from_pb(msg.measurement) if msg.HasField("measurement") else None,
    )


def _last_rig_time(events: Iterable[worker_service_pb2.JobEvent]) -> float | None:
    """The rig's time of the latest event of a report (None: no event says when)."""
    times = [e.time.ToNanoseconds() / 1e9 for e in events if e.HasField("time")]
    return max(times) if times else None


def _report_event(
    i: int, e: worker_service_pb2.JobEvent, worker_id: str, now: float, last: float | None
) -> AttemptReport:
    job_id = v.parse_name(e.job, "jobs", f"events[{i}].job")
    bad = []
    if e.attempt < 1:
        bad.append(FieldViolation(f"events[{i}].attempt", "must be >= 1"))
    if e.sequence < 1:
        bad.append(FieldViolation(f"events[{i}].sequence", "must be >= 1"))
    kind = e.WhichOneof("kind")
    if kind is None:
        bad.append(FieldViolation(f"events[{i}].kind", "one of started/log/progress/finished"))
    if bad:
        raise InvalidArgument.of(bad)
    base = (now, worker_id, job_id, e.attempt, e.sequence)
    if kind == "preparing":
        return AttemptPreparing(*base)
    if kind == "started":
        # The broker's clock stamps reports; the rig's clock only measures how long before
        # the report's last event the process started (the core bounds it by the assignment).
        lead = 0.0
        if last is not None and e.HasField("time"):
            lead = max(0.0, last - e.time.ToNanoseconds() / 1e9)
        return AttemptStarted(*base, setup_ms=max(0, e.started.setup_milliseconds), rig_lead_s=lead)
    if kind == "output":
        out = e.output
        if out.sha256:
            _sha_list([out.sha256], f"events[{i}].output.sha256")
        return AttemptOutputReported(
            *base,
            sha256=out.sha256,
            size_bytes=max(0, out.size_bytes),
            over_limit=out.over_limit,
            message=out.message[:1024],
        )
    if kind == "log":
        if len(e.log.data) > 1 << 20:
            raise InvalidArgument.of([FieldViolation(f"events[{i}].log.data", "at most 1 MiB")])
        return AttemptLog(*base, data=e.log.data)
    if kind == "progress":
        return AttemptProgress(*base, energy_joules=max(0, e.progress.energy_joules))
    if kind == "checkpoint":
        (sha,) = _sha_list([e.checkpoint.sha256], f"events[{i}].checkpoint.sha256")
        return AttemptCheckpointed(*base, sha256=sha)
    cause = e.finished.cause
    return AttemptFinished(
        *base,
        exit_code=e.finished.exit_code,
        energy_joules=max(0, e.finished.energy_joules),
        message=e.finished.message[:1024],
        cause=SetupCause(worker_service_pb2.Finished.Cause.Name(cause)) if cause else None,
        setup_ms=max(0, e.finished.setup_milliseconds),
    )


def _sha_list(values: Iterable[str], field: str) -> list[str]:
    """Hex sha256 strings (at most 64), else InvalidArgument naming ``field``."""
    out = list(values)
    if len(out) > 64:
        raise InvalidArgument.of([FieldViolation(field, "at most 64 entries")])
    for sha in out:
        ArtifactStore.check(sha, field)
    return out


def _image_list(values: Iterable[str]) -> list[str]:
    """The image references a rig holds (at most 128: 64 images, each by the reference it was
    pulled by and by digest), else InvalidArgument. Entries that are not references are
    dropped: they cannot match a job's image, and a heartbeat must not fail for them."""
    out = list(values)
    if len(out) > 128:
        raise InvalidArgument.of([FieldViolation("status.images", "at most 128 entries")])
    return [ref for ref in out if ref and not v.check_image(ref)]


async def _ended(task: asyncio.Task[None]) -> None:
    """Wait until ``task`` is done, whatever it raised."""
    with contextlib.suppress(BaseException):
        await task
