"""gRPC servicers: turn RPCs into core events and core state into messages.

Errors cross one boundary here: every ``BrokerError`` becomes a gRPC status with
``google.rpc.ErrorInfo`` and ``google.rpc.BadRequest`` details in ``abort_with``
(and ``google.rpc.RetryInfo`` when the error says when to retry: rate limits, a
database outage); anything else is a bug, logged and answered ``INTERNAL``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker import validation as v
from broker.artifacts import CHUNK_BYTES, ArtifactStore, Purpose
from broker.auth import Principal, Role, authorize, current, set_current
from broker.convert import earnings_pb, farm_pb, job_pb, timestamp, worker_pb
from broker.core import Attempt, BrokerCore, Job
from broker.economics import FarmTerms
from broker.errors import (
    AlreadyExists,
    BrokerError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
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
    CancelRequested,
    DrainRequested,
    FarmConfigured,
    Heartbeat,
    JobSubmitted,
    WorkerRegistered,
)
from broker.model import TERMINAL_JOB_STATES, JobSpec, JobState, SetupCause
from broker.scheduler import place
from broker.service import BrokerService, cancellation, sha256_hex
from broker.store import FarmRow
from rigshift.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    farm_pb2,
    farm_service_pb2,
    farm_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

__all__ = [
    "ERROR_DOMAIN",
    "STATUS_CODES",
    "AdminServicer",
    "ArtifactServicer",
    "FarmServicer",
    "JobServicer",
    "SafeDecodeInterceptor",
    "WorkerServicer",
    "abort_with",
    "status_code",
    "to_status",
]

log = logging.getLogger("rigshift.broker.api")
ERROR_DOMAIN = "rigshift.dev"


#: The gRPC status each error class stands for; a subclass answers its nearest listed base.
STATUS_CODES: dict[type[BrokerError], grpc.StatusCode] = {
    BrokerError: grpc.StatusCode.UNKNOWN,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code(err: BrokerError) -> grpc.StatusCode:
    """The gRPC status code that ``err`` is answered with."""
    for cls in type(err).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    raise AssertionError(f"{type(err).__name__} is not a BrokerError")  # pragma: no cover


def to_status(err: BrokerError) -> grpc.Status:
    """The rich status for ``err``: ErrorInfo, then BadRequest (field violations), then
    RetryInfo (when the error says when to retry: rate limits, a database outage)."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN)
    info.metadata.update(err.metadata)
    details: list[Message] = [info]
    if err.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=fv.field, description=fv.description
                    )
                    for fv in err.violations
                ]
            )
        )
    if err.retry_after_s is not None:
        seconds = err.retry_after_s
        details.append(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(
                    seconds=int(seconds), nanos=int((seconds % 1) * 1e9)
                )
            )
        )
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    code = status_code(err).value[0]
    return rpc_status.to_status(status_pb2.Status(code=code, message=err.message, details=packed))


async def abort_with(context: grpc.aio.ServicerContext, err: BrokerError) -> None:
    """End the RPC with the status that ``err`` stands for (raises AbortError)."""
    status = to_status(err)
    await context.abort(status.code, status.details, status.trailing_metadata)


async def _internal(context: grpc.aio.ServicerContext, method: str) -> None:
    log.exception("bug in %s", method)
    status = status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error in {method}")
    s = rpc_status.to_status(status)
    await context.abort(s.code, s.details, s.trailing_metadata)


class MalformedRequest:
    """Stands in for a request whose bytes did not parse; the handler answers INVALID_ARGUMENT."""

    def __init__(self, error: str) -> None:
        self.error = error


def _malformed(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidArgument(
            f"the request is not a valid protobuf message: {request.error}",
            reason="MALFORMED_REQUEST",
        )


class SafeDecodeInterceptor(grpc.aio.ServerInterceptor):
    """Lets undecodable request bytes reach the handler as :class:`MalformedRequest`,
    so they are answered INVALID_ARGUMENT instead of grpc's UNKNOWN."""

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def safe(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as err:  # DecodeError and friends
                return MalformedRequest(f"{type(err).__name__}: {err}"[:200])

        return handler._replace(request_deserializer=safe)


def _admit(self: Any, method: str, context: grpc.aio.ServicerContext) -> None:
    """Authenticate, authorise and rate-limit one call; binds the caller for ``auth.current``."""
    svc: BrokerService = self.svc
    principal = svc.authenticate(_metadata(context))
    authorize(f"{self.SERVICE}/{method}", principal)
    if principal is not None and principal.role in (Role.CLIENT, Role.OPERATOR):
        svc.rate_limiter.check(f"{principal.role.value}:{principal.name}", svc.clock())
    set_current(principal)


def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Admit the caller and map errors of a unary (or client-streaming) method."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _admit(self, fn.__name__, context)
            _malformed(request)
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except BrokerError as err:
            await abort_with(context, err)
        except Exception:
            await _internal(context, fn.__name__)

    return wrapper


def streaming(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Admit the caller and map errors of a server-streaming method."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _admit(self, fn.__name__, context)
            _malformed(request)
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except BrokerError as err:
            await abort_with(context, err)
        except Exception:
            await _internal(context, fn.__name__)

    return wrapper


def _metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in (context.invocation_metadata() or ()))


def _own_job(svc: BrokerService, name: str) -> Job:
    """The job, if the caller may see it: clients only their own, admins every job."""
    job = svc.core.job(v.parse_name(name, "jobs"))
    who = current()
    if who.role != Role.ADMIN and job.owner != who.name:
        raise PermissionDenied(
            f"jobs/{job.job_id} belongs to another client", reason="NOT_YOUR_JOB"
        )
    return job


def _farm_scope(parent: str, field: str = "parent") -> str:
    """The farm a farm-scoped call may look at: operators only their own."""
    who = current()
    farm_id = ""
    if parent not in ("", "farms/-"):
        farm_id = v.parse_name(parent, "farms", field)
    if who.role == Role.OPERATOR:
        if farm_id and farm_id != who.farm_id:
            raise PermissionDenied(
                f"operator {who.name!r} manages farms/{who.farm_id}, not farms/{farm_id}",
                reason="NOT_YOUR_FARM",
            )
        return who.farm_id
    return farm_id


class JobServicer(job_service_pb2_grpc.JobServiceServicer):
    """rigshift.v1.JobService."""

    SERVICE = "JobService"

    def __init__(
        self,
        svc: BrokerService,
        default_max_attempts: int = 3,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.svc = svc
        self.default_max_attempts = default_max_attempts
        self.artifacts = artifacts  # where attempt outputs are kept

    @unary
    async def CreateJob(self, request, context):  # type: ignore[no-untyped-def]
        request_id = v.check_request_id(request.request_id)
        if not request.HasField("spec"):
            raise InvalidArgument.of([FieldViolation("spec", "is required")])
        spec = v.check_job_spec(request.spec, self.default_max_attempts)
        job_id = uuid.uuid4().hex[:16]
        owner = current().name
        await self.svc.apply(JobSubmitted(self.svc.clock(), job_id, owner, spec, request_id))
        if request_id:
            job_id = self.svc.core.requests[(owner, request_id)]
        return job_pb(self.svc.core.job(job_id), self.svc.clock())

    @unary
    async def GetJob(self, request, context):  # type: ignore[no-untyped-def]
        return job_pb(_own_job(self.svc, request.name), self.svc.clock())

    @unary
    async def ListJobs(self, request, context):  # type: ignore[no-untyped-def]
        limit, offset = v.check_page(request.page_size, request.page_token)
        states = set()
        for i, s in enumerate(request.states):
            if s == job_pb2.Job.STATE_UNSPECIFIED or s not in job_pb2.Job.State.values():
                raise InvalidArgument.of([FieldViolation(f"states[{i}]", f"unknown state {s}")])
            states.add(JobState(job_pb2.Job.State.Name(s)))
        who = current()
        jobs = [
            j
            for j in self.svc.core.jobs.values()
            if (not states or j.state in states) and (who.role == Role.ADMIN or j.owner == who.name)
        ]
        jobs.sort(key=lambda j: (-j.create_time, j.job_id))
        page = jobs[offset : offset + limit]
        now = self.svc.clock()
        more = offset + limit < len(jobs)
        return job_service_pb2.ListJobsResponse(
            jobs=[job_pb(j, now) for j in page],
            next_page_token=f"o{offset + limit}" if more else "",
        )

    @unary
    async def CancelJob(self, request, context):  # type: ignore[no-untyped-def]
        job = _own_job(self.svc, request.name)
        await self.svc.apply(CancelRequested(self.svc.clock(), job.job_id))
        return job_pb(job, self.svc.clock())

    @unary
    async def QuoteJob(self, request, context):  # type: ignore[no-untyped-def]
        if not request.HasField("spec"):
            raise InvalidArgument.of([FieldViolation("spec", "is required")])
        spec = v.check_job_spec(request.spec, self.default_max_attempts)
        return _quote(self.svc.core, spec, self.svc.clock())

    @streaming
    async def WatchJob(self, request, context):  # type: ignore[no-untyped-def]
        job = _own_job(self.svc, request.name)
        with self.svc.subscribe(job.job_id) as changed:
            while True:
                changed.clear()
                yield job_pb(job, self.svc.clock())
                if job.state in TERMINAL_JOB_STATES and not (job.current and job.current.live):
                    return
                await changed.wait()

    @streaming
    async def StreamJobLogs(self, request, context):  # type: ignore[no-untyped-def]
        job = _own_job(self.svc, request.name)
        job_id = job.job_id
        last_id = 0
        with self.svc.subscribe(job_id) as changed:
            while True:
                changed.clear()
                done = job.state in TERMINAL_JOB_STATES and not (job.current and job.current.live)
                for row in self.svc.store.logs(job_id, last_id):
                    last_id = row.id or last_id
                    yield job_service_pb2.LogChunk(attempt=row.attempt, data=row.data)
                if not request.follow or done:
                    return
                await changed.wait()

    @unary
    async def ListJobOutputs(self, request, context):  # type: ignore[no-untyped-def]
        job = _own_job(self.svc, request.name)
        return job_service_pb2.ListJobOutputsResponse(
            outputs=[
                job_pb2.JobOutput(
                    attempt=a.number,
                    sha256=a.output.sha256,
                    size_bytes=a.output.size_bytes,
                    create_time=timestamp(a.output.time),
                    over_limit=a.output.over_limit,
                    message=a.output.message,
                )
                for a in job.attempts
                if a.output is not None
            ]
        )

    @streaming
    async def DownloadJobOutput(self, request, context):  # type: ignore[no-untyped-def]
        job = _own_job(self.svc, request.name)
        attempt = _output_attempt(job, request.attempt)
        assert attempt.output is not None and self.artifacts is not None
        sha256 = attempt.output.sha256
        try:
            size = self.artifacts.size(sha256)
        except NotFound:
            raise NotFound(
                f"the output of jobs/{job.job_id} attempt {attempt.number} is no longer kept "
                "(removed after the retention period)",
                reason="OUTPUT_EXPIRED",
                metadata={"attempt": str(attempt.number), "sha256": sha256},
            ) from None
        if not 0 <= request.offset <= size:
            raise InvalidArgument.of(
                [FieldViolation("offset", f"must be between 0 and the size ({size})")]
            )
        first = job_service_pb2.DownloadJobOutputResponse(
            sha256=sha256, size_bytes=size, attempt=attempt.number
        )
        for data in self.artifacts.read(sha256, request.offset):
            if first is not None:
                first.data = data
                yield first
                first = None
            else:
                yield job_service_pb2.DownloadJobOutputResponse(data=data)
        if first is not None:  # nothing left after the offset: still say what it is
            yield first


def _output_attempt(job: Job, number: int) -> Attempt:
    """The attempt whose kept output DownloadJobOutput serves (0: the latest one)."""
    if number < 0:
        raise InvalidArgument.of([FieldViolation("attempt", "must be >= 0")])
    if number == 0:
        kept = [a for a in job.attempts if a.output and a.output.sha256 and not a.output.over_limit]
        if not kept:
            raise NotFound(
                f"no attempt of jobs/{job.job_id} has kept an output",
                reason="NO_OUTPUT",
                metadata={"job": job.job_id},
            )
        return kept[-1]
    if number > len(job.attempts) or job.attempts[number - 1].output is None:
        raise NotFound(
            f"attempt {number} of jobs/{job.job_id} has no output",
            reason="NO_OUTPUT",
            metadata={"job": job.job_id, "attempt": str(number)},
        )
    attempt = job.attempts[number - 1]
    out = attempt.output
    assert out is not None
    if out.over_limit:
        raise FailedPrecondition(
            out.message or f"the output of attempt {number} was over the limit and not kept",
            reason="OUTPUT_OVER_LIMIT",
            metadata={"attempt": str(number), "size_bytes": str(out.size_bytes)},
        )
    if not out.sha256:
        raise NotFound(
            out.message or f"attempt {number} of jobs/{job.job_id} kept no output",
            reason="NO_OUTPUT",
            metadata={"job": job.job_id, "attempt": str(number)},
        )
    return attempt


def _quote(core: BrokerCore, spec: JobSpec, now: float) -> job_service_pb2.QuoteJobResponse:
    """What a spec would pay and how much of the fleet matches it; changes nothing."""
    probe = Job("quote", "", spec, now)
    request = core._request(probe)
    snap = core.snapshot(now)
    result = place(replace(snap, pending=(replace(request, job_id="quote"),)))
    matching = free = 0
    prices = []
    for worker in snap.workers:
        rig = core.workers[worker.worker_id]
        for g in worker.gpus:
            if spec.gpu_model and g.model != spec.gpu_model:
                continue
            if g.vram_mb < spec.min_vram_mb:
                continue
            price = core.price_for(probe, g.price_micros_per_gpu_hour, core.floor_of(rig, g.index))
            cap = spec.max_price_micros_per_gpu_hour
            if cap and price > cap:
                continue
            matching += 1
            free += g.free
            prices.append(price)
    reasons = result.unplaced[0].reasons if result.unplaced else ()
    return job_service_pb2.QuoteJobResponse(
        matching_gpus=matching,
        free_matching_gpus=free,
        min_price_micros_per_gpu_hour=min(prices, default=0),
        max_price_micros_per_gpu_hour=max(prices, default=0),
        placeable_now=bool(result.placements),
        reasons=[
            job_pb2.SchedulingReason(
                resource=r.resource,
                requested=r.requested,
                available=r.available,
                resolvable=r.resolvable,
                message=r.message,
            )
            for r in reasons
        ],
    )


class FarmServicer(farm_service_pb2_grpc.FarmServiceServicer):
    """rigshift.v1.FarmService."""

    SERVICE = "FarmService"

    def __init__(self, svc: BrokerService) -> None:
        self.svc = svc

    def _watts(self, farm_id: str) -> dict[str, int]:
        """Highest power limit per GPU model registered in the farm."""
        watts: dict[str, int] = {}
        for w in self.svc.core.workers.values():
            if w.farm_id == farm_id:
                for g in w.gpus.values():
                    m = g.info.model
                    watts[m] = max(watts.get(m, 0), g.info.power_limit_watts)
        return watts

    def _farm(self, row: FarmRow, token: str = "") -> farm_pb2.Farm:
        return farm_pb(row, token, self._watts(row.id))

    @unary
    async def CreateFarm(self, request, context):  # type: ignore[no-untyped-def]
        if not request.HasField("farm"):
            raise InvalidArgument.of([FieldViolation("farm", "is required")])
        f = request.farm
        v.check_farm(f)
        farm_id = uuid.uuid4().hex[:12]
        terms = v.terms_from(farm_id, f)
        if not f.broker_fee_permille:
            terms = replace(terms, broker_fee_permille=self.svc.core.default_fee_permille)
        v.check_asks(terms, {})
        token = "rsft_" + secrets.token_urlsafe(24)
        self.svc.ensure_writable()  # the row and the core's terms must not part
        row = FarmRow(
            id=farm_id,
            display_name=f.display_name.strip(),
            region=f.region,
            enrollment_token_sha256=sha256_hex(token),
            create_time=self.svc.clock(),
            **_terms_columns(terms),
        )
        row = self.svc.store.create_farm(row)
        await self.svc.apply(FarmConfigured(self.svc.clock(), terms))
        return self._farm(row, token)

    @unary
    async def UpdateFarm(self, request, context):  # type: ignore[no-untyped-def]
        if not request.HasField("farm"):
            raise InvalidArgument.of([FieldViolation("farm", "is required")])
        farm_id = _farm_scope(request.farm.name, "farm.name") or v.parse_name(
            request.farm.name, "farms", "farm.name"
        )
        paths = tuple(request.update_mask.paths)
        if current().role != Role.ADMIN and "broker_fee_permille" in paths:
            raise PermissionDenied("only an admin sets the broker fee", reason="ADMIN_ONLY_FIELD")
        unknown = [p for p in paths if p not in v.FARM_FIELDS]
        if unknown:
            raise InvalidArgument.of(
                [FieldViolation("update_mask", f"cannot update {p!r}") for p in unknown]
            )
        if not paths:  # AIP-134: no mask means every field that is set
            paths = tuple(fd.name for fd, _ in request.farm.ListFields() if fd.name != "name")
        v.check_farm(request.farm, paths)
        row = self.svc.store.get_farm(farm_id)
        stored = farm_pb(row)
        merged = farm_pb2.Farm()
        merged.CopyFrom(stored)
        for path in paths:
            merged.ClearField(path)
            value = getattr(request.farm, path)
            if path in ("mining_micros_per_kwh", "ask_micros_per_gpu_hour"):
                getattr(merged, path).update(value)
            elif path == "tariff_windows":
                merged.tariff_windows.extend(value)
            else:
                setattr(merged, path, value)
        terms = v.terms_from(farm_id, merged)
        if not merged.broker_fee_permille:
            terms = replace(terms, broker_fee_permille=self.svc.core.default_fee_permille)
        v.check_asks(terms, self._watts(farm_id))
        changes: dict[str, object] = dict(_terms_columns(terms))
        changes["display_name"] = merged.display_name.strip()
        changes["region"] = merged.region
        self.svc.ensure_writable()
        row = self.svc.store.update_farm(farm_id, changes)
        await self.svc.apply(FarmConfigured(self.svc.clock(), terms))
        return self._farm(row)

    @unary
    async def GetFarm(self, request, context):  # type: ignore[no-untyped-def]
        farm_id = _farm_scope(request.name, "name") or v.parse_name(request.name, "farms")
        return self._farm(self.svc.store.get_farm(farm_id))

    @unary
    async def ListWorkers(self, request, context):  # type: ignore[no-untyped-def]
        limit, offset = v.check_page(request.page_size, request.page_token)
        farm_id = _farm_scope(request.parent)
        if farm_id and farm_id not in self.svc.core.farms:
            self.svc.store.get_farm(farm_id)  # NotFound for an unknown farm
        workers = sorted(
            (w for w in self.svc.core.workers.values() if not farm_id or w.farm_id == farm_id),
            key=lambda w: (w.farm_id, w.hostname, w.worker_id),
        )
        page = workers[offset : offset + limit]
        more = offset + limit < len(workers)
        now = self.svc.clock()
        return farm_service_pb2.ListWorkersResponse(
            workers=[worker_pb(w, self.svc.core, now) for w in page],
            next_page_token=f"o{offset + limit}" if more else "",
        )

    @unary
    async def DrainWorker(self, request, context):  # type: ignore[no-untyped-def]
        worker_id = v.parse_name(request.name, "workers")
        caller = current()
        if caller.role == Role.WORKER:
            if caller.name != worker_id:
                raise PermissionDenied(
                    f"a worker may drain only itself, not workers/{worker_id}",
                    reason="NOT_YOUR_WORKER",
                )
        elif not caller.owns_farm(self.svc.core.worker(worker_id).farm_id):
            raise PermissionDenied(
                f"workers/{worker_id} is not on your farm", reason="NOT_YOUR_FARM"
            )
        await self.svc.apply(DrainRequested(self.svc.clock(), worker_id))
        return worker_pb(self.svc.core.worker(worker_id), self.svc.core, self.svc.clock())

    @unary
    async def GetEarnings(self, request, context):  # type: ignore[no-untyped-def]
        farm_id = _farm_scope(request.parent)
        if farm_id and farm_id not in self.svc.core.farms:
            self.svc.store.get_farm(farm_id)  # NotFound for an unknown farm
        groups = {0: "farm", 1: "farm", 2: "worker", 3: "gpu"}
        if request.group_by not in groups:
            raise InvalidArgument.of([FieldViolation("group_by", "unknown grouping")])
        since = request.since.ToNanoseconds() / 1e9 if request.HasField("since") else 0.0
        return earnings_pb(
            self.svc.core,
            farm_id=farm_id,
            since=since,
            group_by=groups[request.group_by],
            farm_name=self.svc.farm_names,
        )


def _terms_columns(terms: FarmTerms) -> dict[str, object]:
    return {
        "tariff_micros_per_kwh": terms.tariff_micros_per_kwh,
        "pue_permille": terms.pue_permille,
        "broker_fee_permille": terms.broker_fee_permille,
        "margin_micros_per_gpu_hour": terms.margin_micros_per_gpu_hour,
        "mining_json": json.dumps(dict(terms.mining_micros_per_kwh), sort_keys=True),
        "asks_json": json.dumps(dict(terms.ask_micros_per_gpu_hour), sort_keys=True),
        "tariff_windows_json": json.dumps(
            [[w.start_hour, w.end_hour, w.micros_per_kwh] for w in terms.tariff_windows]
        ),
    }


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
    async def RegisterWorker(self, request, context):  # type: ignore[no-untyped-def]
        violations = []
        if not request.enrollment_token:
            violations.append(FieldViolation("enrollment_token", "is required"))
        if not request.hostname.strip() or len(request.hostname) > 253:
            violations.append(FieldViolation("hostname", "must be 1-253 characters"))
        if len(request.agent_version) > 64:
            violations.append(FieldViolation("agent_version", "at most 64 characters"))
        if len(request.metrics_address) > 253:
            violations.append(FieldViolation("metrics_address", "at most 253 characters"))
        if violations:
            raise InvalidArgument.of(violations)
        gpus = v.check_gpus(list(request.gpus))
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
            )
        )
        return worker_service_pb2.RegisterWorkerResponse(
            worker=f"workers/{worker_id}",
            credential=credential,
            lease_ttl_seconds=int(self.lease_ttl_s),
            heartbeat_interval_seconds=max(1, int(self.heartbeat_interval_s)),
        )

    @unary
    async def Heartbeat(self, request, context):  # type: ignore[no-untyped-def]
        worker_id = self._auth(request.worker, context)
        environments = None
        if request.HasField("status"):
            environments = tuple(_sha_list(request.status.environments, "status.environments"))
        await self.svc.apply(Heartbeat(self.svc.clock(), worker_id, environments))
        worker = self.svc.core.workers[worker_id]
        return worker_service_pb2.HeartbeatResponse(
            lease_expire_time=timestamp(worker.lease_expires_at),
            status_wanted=worker.environments is None,
        )

    @streaming
    async def StreamInstructions(self, request, context):  # type: ignore[no-untyped-def]
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

    @unary
    async def ReportJobEvents(self, request, context):  # type: ignore[no-untyped-def]
        worker_id = self._auth(request.worker, context)
        if len(request.events) > 1000:
            raise InvalidArgument.of([FieldViolation("events", "at most 1000 per call")])
        now = self.svc.clock()
        events: list[AttemptReport] = []
        for i, e in enumerate(request.events):
            events.append(_report_event(i, e, worker_id, now))
        fresh = [e for e in events if not self.svc.core.is_duplicate(e)]
        cmds = await self.svc.apply(*fresh)
        stale = {}
        for c in cmds:
            if isinstance(c, Cancel) and c.worker_id == worker_id:
                stale[(c.job_id, c.attempt)] = cancellation(c).cancellation
        return worker_service_pb2.ReportJobEventsResponse(
            applied=len(fresh), stale=list(stale.values())
        )


def _report_event(
    i: int, e: worker_service_pb2.JobEvent, worker_id: str, now: float
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
        return AttemptStarted(*base, setup_ms=max(0, e.started.setup_milliseconds))
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


def _sha_list(values: Any, field: str) -> list[str]:
    """Hex sha256 strings (at most 64), else InvalidArgument naming ``field``."""
    out = list(values)
    if len(out) > 64:
        raise InvalidArgument.of([FieldViolation(field, "at most 64 entries")])
    for sha in out:
        ArtifactStore.check(sha, field)
    return out


class ArtifactServicer(artifact_service_pb2_grpc.ArtifactServiceServicer):
    """rigshift.v1.ArtifactService: working directories, checkpoints, inputs and outputs."""

    SERVICE = "ArtifactService"

    def __init__(self, svc: BrokerService, artifacts: ArtifactStore) -> None:
        self.svc = svc
        self.artifacts = artifacts

    @unary
    async def UploadArtifact(self, request_iterator, context):  # type: ignore[no-untyped-def]
        writer = None
        sha256 = ""
        size = 0
        try:
            async for chunk in request_iterator:
                _malformed(chunk)
                if len(chunk.data) > CHUNK_BYTES:
                    raise InvalidArgument.of([FieldViolation("data", "at most 1 MiB per chunk")])
                if writer is None:
                    sha256, size = self.artifacts.check(chunk.sha256), chunk.size_bytes
                    purpose = self._purpose(chunk.purpose)
                    if self.artifacts.exists(sha256):  # the same data is not stored twice
                        self.artifacts.touch(sha256)
                        size = self.artifacts.size(sha256)
                        return artifact_service_pb2.Artifact(sha256=sha256, size_bytes=size)
                    writer = self.artifacts.writer(
                        sha256, size, purpose=purpose, offset=chunk.offset
                    )
                    if chunk.offset:
                        await asyncio.to_thread(writer.rehash)
                writer.write(chunk.data)
            if writer is None:
                raise InvalidArgument.of([FieldViolation("sha256", "no chunks were sent")])
            done, writer = writer, None
            done.commit()  # keeps a short upload for a resume, drops a wrong one
        except BrokerError:
            if writer is not None:
                writer.discard()
            raise
        finally:
            if writer is not None:
                writer.keep()  # the stream broke: what arrived stays for a resume
        return artifact_service_pb2.Artifact(sha256=sha256, size_bytes=size)

    @staticmethod
    def _purpose(value: int) -> Purpose:
        """The upload's purpose; only workers upload attempt outputs."""
        try:
            purpose = Purpose(value)
        except ValueError:
            violation = FieldViolation("purpose", f"unknown purpose {value}")
            raise InvalidArgument.of([violation]) from None
        if purpose == Purpose.OUTPUT and current().role != Role.WORKER:
            raise PermissionDenied(
                "only agents upload attempt outputs", reason="OUTPUT_UPLOAD_NOT_ALLOWED"
            )
        return purpose

    @unary
    async def GetUploadStatus(self, request, context):  # type: ignore[no-untyped-def]
        sha256 = self.artifacts.check(request.sha256)
        complete, received = self.artifacts.status(sha256)
        return artifact_service_pb2.UploadStatus(
            sha256=sha256, complete=complete, received_bytes=received
        )

    def _may_read(self, who: Principal, sha256: str) -> bool:
        """Workers read what their live attempts need, clients what their jobs refer to:
        working directory, checkpoint and inputs.

        An attempt's output is read by its job's owner through JobService.DownloadJobOutput;
        naming another client's output in a job of one's own does not make it readable.
        """
        core = self.svc.core
        if who.role == Role.WORKER:
            jobs = [job for job, _ in core.live_attempts(who.name)]
        else:
            jobs = [j for j in core.jobs.values() if j.owner == who.name]
        readers = {j.owner for j in jobs if sha256 in _artifacts_needed(j)}
        if not readers:
            return False
        producers = {
            j.owner
            for j in core.jobs.values()
            if any(a.output is not None and a.output.sha256 == sha256 for a in j.attempts)
        }
        return not producers or bool(readers & producers)

    @streaming
    async def DownloadArtifact(self, request, context):  # type: ignore[no-untyped-def]
        self.artifacts.check(request.sha256)
        who = current()
        if who.role != Role.ADMIN and not self._may_read(who, request.sha256):
            raise PermissionDenied(
                "no job of yours refers to this artifact", reason="NOT_YOUR_ARTIFACT"
            )
        if not self.artifacts.exists(request.sha256):
            raise NotFound(f"artifact {request.sha256[:80]} not found")
        for chunk in self.artifacts.read(request.sha256):
            yield artifact_service_pb2.ArtifactChunk(data=chunk)


def _artifacts_needed(job: Job) -> tuple[str, ...]:
    """What a job's attempts download: its working directory, checkpoint and inputs."""
    return (
        job.spec.working_dir_sha256,
        job.checkpoint_sha256,
        *(sha for _, sha in job.spec.inputs),
    )


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    """rigshift.v1.AdminService: API keys."""

    SERVICE = "AdminService"

    def __init__(self, svc: BrokerService) -> None:
        self.svc = svc

    @staticmethod
    def _key_pb(row, secret: str = "") -> admin_service_pb2.ApiKey:  # type: ignore[no-untyped-def]
        return admin_service_pb2.ApiKey(
            name=f"apiKeys/{row.id}",
            role=row.role,
            principal=row.principal,
            farm=f"farms/{row.farm_id}" if row.farm_id else "",
            key=secret,
            create_time=timestamp(row.create_time),
            revoked=row.revoked,
        )

    @unary
    async def CreateApiKey(self, request, context):  # type: ignore[no-untyped-def]
        bad = []
        roles = {
            admin_service_pb2.ApiKey.CLIENT: Role.CLIENT,
            admin_service_pb2.ApiKey.OPERATOR: Role.OPERATOR,
            admin_service_pb2.ApiKey.ADMIN: Role.ADMIN,
        }
        role = roles.get(request.role)
        if role is None:
            bad.append(FieldViolation("role", "must be CLIENT, OPERATOR or ADMIN"))
        if not v.ID_RE.match(request.principal):
            bad.append(FieldViolation("principal", "1-64 letters, digits, '_', '.', '-'"))
        farm_id = ""
        if role == Role.OPERATOR:
            if not request.farm:
                bad.append(FieldViolation("farm", "is required for an OPERATOR key"))
            else:
                farm_id = v.parse_name(request.farm, "farms", "farm")
        elif request.farm:
            bad.append(FieldViolation("farm", "only OPERATOR keys belong to a farm"))
        if bad:
            raise InvalidArgument.of(bad)
        if farm_id:
            self.svc.store.get_farm(farm_id)
        assert role is not None
        key_id, secret = self.svc.create_api_key(role, request.principal, farm_id)
        row = next(r for r in self.svc.store.api_keys() if r.id == key_id)
        return self._key_pb(row, secret)

    @unary
    async def ListApiKeys(self, request, context):  # type: ignore[no-untyped-def]
        return admin_service_pb2.ListApiKeysResponse(
            api_keys=[self._key_pb(r) for r in self.svc.store.api_keys()]
        )

    @unary
    async def RevokeApiKey(self, request, context):  # type: ignore[no-untyped-def]
        row = self.svc.store.revoke_api_key(v.parse_name(request.name, "apiKeys"))
        self.svc.reload_api_keys()
        return self._key_pb(row)
