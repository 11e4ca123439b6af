"""rigshift.v1.JobService: clients submit, list, watch, cancel and quote jobs, read logs
and download outputs."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Collection, Iterable

import grpc

from broker import validation as v
from broker.api.common import own_job, streaming, unary
from broker.artifacts import ArtifactStore
from broker.auth import Role, current
from broker.convert import job_pb, quote_pb, timestamp
from broker.core import Attempt, Job
from broker.errors import (
    DatabaseUnavailable,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from broker.events import (
    CancelRequested,
    JobSubmitted,
)
from broker.forget import finished
from broker.model import TERMINAL_JOB_STATES, JobState
from broker.service import BrokerService
from broker.store.reads import PageKey
from rigshift.v1 import (
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)


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
    async def CreateJob(
        self, request: job_service_pb2.CreateJobRequest, context: grpc.aio.ServicerContext
    ) -> job_pb2.Job:
        request_id = v.check_request_id(request.request_id)
        if not request.HasField("spec"):
            raise InvalidArgument.of([FieldViolation("spec", "is required")])
        spec = v.check_job_spec(request.spec, self.default_max_attempts)
        v.check_registry_auth(request.registry_auth, spec.image)
        job_id = uuid.uuid4().hex[:16]
        owner = current().name
        if request_id and (owner, request_id) not in self.svc.core.requests:
            # A retry of a job the core has let go of (finished): the store still has it.
            stored = self.svc.store.job_id_for_request(owner, request_id)
            if stored is not None:
                return job_pb(self.svc.read_job(stored), self.svc.clock())
        # Held before the job exists, so the first assignment of it carries the credentials.
        self.svc.hold_registry_auth(job_id, request.registry_auth)
        try:
            await self.svc.apply(JobSubmitted(self.svc.clock(), job_id, owner, spec, request_id))
        finally:
            created = self.svc.core.jobs.get(job_id)
            if created is None or created.state in TERMINAL_JOB_STATES:
                self.svc.drop_registry_auth(job_id)  # not created (a retry, or refused)
        if request_id:
            key = (owner, request_id)
            job_id = self.svc.core.requests.get(key) or job_id
        return job_pb(self.svc.read_job(job_id), self.svc.clock())

    @unary
    async def GetJob(
        self, request: job_service_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> job_pb2.Job:
        return job_pb(own_job(self.svc, request.name), self.svc.clock())

    @unary
    async def ListJobs(
        self, request: job_service_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> job_service_pb2.ListJobsResponse:
        limit, _ = v.check_page(request.page_size, "")
        after = _page_key(request.page_token)
        states = set()
        for i, s in enumerate(request.states):
            if s == job_pb2.Job.STATE_UNSPECIFIED or s not in job_pb2.Job.State.values():
                raise InvalidArgument.of([FieldViolation(f"states[{i}]", f"unknown state {s}")])
            states.add(JobState(job_pb2.Job.State.Name(s)))
        who = current()
        owner = None if who.role == Role.ADMIN else who.name
        if self.svc.database_down_for() is None:
            try:
                # One query over the store's jobs; a job the core holds is shown as it is now.
                stored, nxt = self.svc.store.list_jobs(owner, states, limit, after)
                jobs = [self.svc.core.jobs.get(j.job_id, j) for j in stored]
            except DatabaseUnavailable:
                jobs, nxt = _held_page(self.svc.core.jobs.values(), owner, states, limit, after)
        else:
            # A database outage: the jobs the core holds (live, and those whose changes it
            # keeps until the database is back), in the same order and page tokens.
            jobs, nxt = _held_page(self.svc.core.jobs.values(), owner, states, limit, after)
        now = self.svc.clock()
        return job_service_pb2.ListJobsResponse(
            jobs=[job_pb(j, now) for j in jobs], next_page_token=_page_token(nxt)
        )

    @unary
    async def CancelJob(
        self, request: job_service_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> job_pb2.Job:
        job = own_job(self.svc, request.name)
        if self.svc.core.jobs.get(job.job_id) is job:
            try:
                await self.svc.apply(CancelRequested(self.svc.clock(), job.job_id))
            except NotFound:
                job = self.svc.read_job(job.job_id)  # it finished and left the core meanwhile
            else:
                return job_pb(job, self.svc.clock())
        # Read from the store: finished (the core holds every job that is not).
        if job.state != JobState.CANCELLED:
            raise finished(job)
        return job_pb(job, self.svc.clock())

    @unary
    async def QuoteJob(
        self, request: job_service_pb2.QuoteJobRequest, context: grpc.aio.ServicerContext
    ) -> job_service_pb2.QuoteJobResponse:
        if not request.HasField("spec"):
            raise InvalidArgument.of([FieldViolation("spec", "is required")])
        spec = v.check_job_spec(request.spec, self.default_max_attempts)
        return quote_pb(self.svc.core.quote(spec))

    @streaming
    async def WatchJob(
        self, request: job_service_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[job_pb2.Job]:
        job = own_job(self.svc, request.name)
        with self.svc.subscribe(job.job_id) as changed:
            while True:
                changed.clear()
                yield job_pb(job, self.svc.clock())
                if job.state in TERMINAL_JOB_STATES and not (job.current and job.current.live):
                    return
                await changed.wait()

    @streaming
    async def StreamJobLogs(
        self, request: job_service_pb2.StreamJobLogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[job_service_pb2.LogChunk]:
        job = own_job(self.svc, request.name)
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
    async def ListJobOutputs(
        self, request: job_service_pb2.ListJobOutputsRequest, context: grpc.aio.ServicerContext
    ) -> job_service_pb2.ListJobOutputsResponse:
        job = own_job(self.svc, request.name)
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
    async def DownloadJobOutput(
        self, request: job_service_pb2.DownloadJobOutputRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[job_service_pb2.DownloadJobOutputResponse]:
        job = own_job(self.svc, request.name)
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
        first: job_service_pb2.DownloadJobOutputResponse | None = (
            job_service_pb2.DownloadJobOutputResponse(
                sha256=sha256, size_bytes=size, attempt=attempt.number
            )
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


def _held_page(
    held: Iterable[Job],
    owner: str | None,
    states: Collection[JobState],
    limit: int,
    after: PageKey | None,
) -> tuple[list[Job], PageKey | None]:
    """A ListJobs page from the core's memory, ordered and keyed as the store's
    (``Store.list_jobs``): finished jobs the core let go of are not in it."""
    jobs = sorted(
        (
            j
            for j in held
            if (owner is None or j.owner == owner) and (not states or j.state in states)
        ),
        key=lambda j: (-j.create_time, j.job_id),
    )
    if after is not None:
        jobs = [j for j in jobs if (-j.create_time, j.job_id) > (-after.create_time, after.job_id)]
    shown = jobs[:limit]
    nxt = PageKey(shown[-1].create_time, shown[-1].job_id) if len(jobs) > limit else None
    return shown, nxt


def _page_key(token: str) -> PageKey | None:
    """The key a ListJobs page token stands for ("": the first page)."""
    if not token:
        return None
    time_text, sep, job_id = token[1:].partition("_")
    try:
        create_time = float(time_text)
        if token[0] != "k" or not sep or not job_id.isalnum() or not math.isfinite(create_time):
            raise ValueError(token)
        return PageKey(create_time, job_id)
    except ValueError:
        violation = FieldViolation("page_token", "not a token this broker issued")
        raise InvalidArgument.of([violation]) from None


def _page_token(key: PageKey | None) -> str:
    """The opaque token of the page after ``key`` ("" after the last page)."""
    return "" if key is None else f"k{key.create_time!r}_{key.job_id}"


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
