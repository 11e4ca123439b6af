"""Decoding gRPC statuses into client.errors exceptions.

The tests feed ``from_rpc_error`` a tiny fake call built with ``rpc_status.to_status``.
The SDK against an in-process gRPC server on port 0 that answers with the same rich
statuses the broker sends is in tests/integration/test_client_retries.py.
"""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2
from rich_status import rich_status

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


@pytest.mark.parametrize("bad", ["farms/abc", "jobs/", "jobs/a/b", "", "a/b"])
def test_bad_resource_names_are_refused_locally(bad: str) -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(InvalidArgument):
        client.get_job(bad)
