"""The SDK against an in-process gRPC server on port 0 that answers with the rich statuses
the broker sends: decoded errors, retries with one request id through an outage, the retry
budget. Decoding alone (a fake call, no server) is tests/unit/test_client_errors.py."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from rich_status import packed, rich_status

from client import Client, NotFound, Unavailable
from rigshift.v1 import job_pb2, job_service_pb2_grpc

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
                details=[packed(info), packed(retry)],
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
