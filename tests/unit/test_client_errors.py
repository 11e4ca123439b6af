"""Decoding gRPC statuses into client.errors exceptions.

The first tests feed ``from_rpc_error`` a tiny fake call built with
``rpc_status.to_status``; the last ones run the SDK against an in-process
gRPC server on port 0 that answers with the same rich statuses the broker sends.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from client import (
    AlreadyExists,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RigshiftError,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from rigshift.v1 import job_pb2, job_service_pb2_grpc


class FakeCall(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """The part of a failed call that ``from_rpc_error`` reads."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing

    # grpc.Call's other abstract methods; never called here.
    def initial_metadata(self) -> tuple:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: object) -> bool:
        return False


def _packed(msg: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def rich_status(
    code: int,
    message: str,
    reason: str = "",
    violations: tuple[tuple[str, str], ...] = (),
    metadata: dict[str, str] | None = None,
) -> grpc.Status:
    """A status the way the broker builds it: ErrorInfo, then BadRequest."""
    details = []
    if reason:
        info = error_details_pb2.ErrorInfo(
            reason=reason, domain="rigshift.dev", metadata=metadata or {}
        )
        details.append(_packed(info))
    if violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in violations
            ]
        )
        details.append(_packed(bad))
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))


def fake_call(status: grpc.Status) -> FakeCall:
    return FakeCall(status.code, status.details, status.trailing_metadata)


def test_invalid_argument_with_error_info_and_field_violations() -> None:
    status = rich_status(
        code_pb2.INVALID_ARGUMENT,
        "spec.gpu_count: must be between 1 and 64 (got 0)",
        reason="INVALID_GPU_COUNT",
        violations=(("spec.gpu_count", "must be between 1 and 64 (got 0)"),),
        metadata={"got": "0"},
    )
    exc = from_rpc_error(fake_call(status))
    assert type(exc) is InvalidArgument
    assert exc.code is grpc.StatusCode.INVALID_ARGUMENT
    assert exc.message == "spec.gpu_count: must be between 1 and 64 (got 0)"
    assert exc.reason == "INVALID_GPU_COUNT"
    assert exc.metadata == {"got": "0"}
    assert exc.field_violations == [("spec.gpu_count", "must be between 1 and 64 (got 0)")]
    assert str(exc) == "INVALID_ARGUMENT: spec.gpu_count: must be between 1 and 64 (got 0)"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.OUT_OF_RANGE, InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.INTERNAL, InternalError),
        (grpc.StatusCode.UNKNOWN, InternalError),
        (grpc.StatusCode.ABORTED, InternalError),
        (grpc.StatusCode.DATA_LOSS, InternalError),
    ],
)
def test_class_per_code(code: grpc.StatusCode, cls: type[RigshiftError]) -> None:
    status = rich_status(code.value[0], "boom", reason="SOME_REASON")
    exc = from_rpc_error(fake_call(status))
    assert type(exc) is cls
    assert isinstance(exc, RigshiftError)
    assert exc.code is code  # the precise code survives, even when the class is InternalError
    assert exc.reason == "SOME_REASON"
    assert str(exc) == f"{code.name}: boom"


def test_plain_status_without_details() -> None:
    exc = from_rpc_error(FakeCall(grpc.StatusCode.NOT_FOUND, "job jobs/x not found"))
    assert type(exc) is NotFound
    assert (exc.reason, exc.metadata, exc.field_violations) == ("", {}, [])
    assert str(exc) == "NOT_FOUND: job jobs/x not found"


def test_inconsistent_rich_status_is_ignored_not_raised() -> None:
    status = rich_status(code_pb2.NOT_FOUND, "other message", reason="JOB_NOT_FOUND")
    call = FakeCall(grpc.StatusCode.INVALID_ARGUMENT, "bad", status.trailing_metadata)
    exc = from_rpc_error(call)
    assert type(exc) is InvalidArgument
    assert (exc.message, exc.reason) == ("bad", "")


def test_rpc_error_without_call_interface() -> None:
    exc = from_rpc_error(grpc.RpcError("opaque"))
    assert type(exc) is InternalError
    assert exc.code is grpc.StatusCode.UNKNOWN


def test_str_is_one_line() -> None:
    exc = InvalidArgument("first line\nsecond  line")
    assert str(exc) == "INVALID_ARGUMENT: first line second line"
    assert "\n" not in str(InternalError(""))


# -- the SDK against an in-process server ---------------------------------------------


class FlakyJobs(job_service_pb2_grpc.JobServiceServicer):
    """CreateJob fails UNAVAILABLE twice, then succeeds; GetJob always NOT_FOUND."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []

    def CreateJob(self, request, context):
        self.request_ids.append(request.request_id)
        if len(self.request_ids) <= 2:
            context.abort_with_status(rich_status(code_pb2.UNAVAILABLE, "warming up", "WARMING"))
        return job_pb2.Job(name="jobs/1", spec=request.spec, state=job_pb2.Job.PENDING)

    def GetJob(self, request, context):
        context.abort_with_status(
            rich_status(
                code_pb2.NOT_FOUND,
                f"{request.name} not found",
                reason="JOB_NOT_FOUND",
                violations=(("name", "no such job"),),
            )
        )


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, FlakyJobs]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = FlakyJobs()
    job_service_pb2_grpc.add_JobServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_sdk_raises_decoded_error(flaky_server: tuple[str, FlakyJobs]) -> None:
    address, _ = flaky_server
    with Client(address, timeout_s=5) as client, pytest.raises(NotFound) as info:
        client.get_job("abc")
    assert info.value.reason == "JOB_NOT_FOUND"
    assert info.value.message == "jobs/abc not found"
    assert info.value.field_violations == [("name", "no such job")]


def test_create_job_retries_unavailable_with_same_request_id(
    flaky_server: tuple[str, FlakyJobs],
) -> None:
    address, servicer = flaky_server
    with Client(address, timeout_s=5) as client:
        job = client.create_job(["python", "train.py"], gpu_count=2)
    assert job.name == "jobs/1"
    assert list(job.spec.command) == ["python", "train.py"]
    assert len(servicer.request_ids) == 3
    assert len(set(servicer.request_ids)) == 1 and servicer.request_ids[0]


@pytest.mark.parametrize("bad", ["farms/abc", "jobs/", "jobs/a/b", "", "a/b"])
def test_bad_resource_names_are_refused_locally(bad: str) -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(InvalidArgument):
        client.get_job(bad)


class OutageJobs(job_service_pb2_grpc.JobServiceServicer):
    """CreateJob answers as a broker whose database is down (UNAVAILABLE + RetryInfo)
    ``failures`` times, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.request_ids: list[str] = []

    def CreateJob(self, request, context):
        self.request_ids.append(request.request_id)
        if len(self.request_ids) <= self.failures:
            info = error_details_pb2.ErrorInfo(reason="DATABASE_UNAVAILABLE", domain="rigshift.dev")
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromMilliseconds(50)
            status = status_pb2.Status(
                code=code_pb2.UNAVAILABLE,
                message="the database is unavailable",
                details=[_packed(info), _packed(retry)],
            )
            context.abort_with_status(rpc_status.to_status(status))
        return job_pb2.Job(name="jobs/1", spec=request.spec)


def _serve(servicer: OutageJobs) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    job_service_pb2_grpc.add_JobServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_create_job_keeps_retrying_through_an_outage_with_one_request_id() -> None:
    servicer = OutageJobs(failures=8)  # more than the 4 tries the SDK once made
    server, address = _serve(servicer)
    try:
        with Client(address, timeout_s=5) as client:
            job = client.create_job(["true"])
    finally:
        server.stop(None)
    assert job.name == "jobs/1" and len(servicer.request_ids) == 9
    assert len(set(servicer.request_ids)) == 1


def test_an_outage_past_the_budget_raises_with_retry_info_and_the_request_id() -> None:
    servicer = OutageJobs(failures=10_000)
    server, address = _serve(servicer)
    try:
        with (
            Client(address, timeout_s=5, retry_budget_s=0.0) as client,
            pytest.raises(Unavailable) as info,
        ):
            client.create_job(["true"], request_id="r-42")
    finally:
        server.stop(None)
    err = info.value
    assert err.reason == "DATABASE_UNAVAILABLE" and err.retry_after_s == 0.05
    assert err.request_id == "r-42" and len(servicer.request_ids) == 4  # the minimum tries
