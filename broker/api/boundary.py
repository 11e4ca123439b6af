"""Where errors cross from the broker to the wire: the one place that knows gRPC status codes.

Every :class:`~broker.errors.BrokerError` becomes a gRPC status with ``google.rpc.ErrorInfo``
(the error's reason and metadata, domain ``rigshift.dev``), then ``google.rpc.BadRequest``
when it names invalid fields, then ``google.rpc.RetryInfo`` when it says when to retry
(rate limits, a database outage). Anything else escaping a servicer is a bug: logged and
answered ``INTERNAL``. Request bytes that do not parse reach the handler as
:class:`MalformedRequest` (see :class:`SafeDecodeInterceptor`) and are answered
``INVALID_ARGUMENT`` with reason ``MALFORMED_REQUEST``.

``client.errors`` decodes these statuses back into the SDK's exceptions.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.errors import (
    AlreadyExists,
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "ERROR_DOMAIN",
    "STATUS_CODES",
    "MalformedRequest",
    "SafeDecodeInterceptor",
    "abort_internal",
    "abort_with",
    "status_code",
    "to_status",
    "well_formed",
]

log = logging.getLogger("rigshift.broker.api")

#: ``google.rpc.ErrorInfo.domain`` of every error the broker sends.
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

T = TypeVar("T")


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


async def abort_with(context: grpc.aio.ServicerContext, err: BrokerError) -> NoReturn:
    """End the RPC with the status that ``err`` stands for (raises AbortError)."""
    status = to_status(err)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # pragma: no cover


async def abort_internal(context: grpc.aio.ServicerContext, method: str) -> NoReturn:
    """Log the exception being handled as a bug in ``method`` and answer INTERNAL."""
    log.exception("bug in %s", method)
    status = status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error in {method}")
    s = rpc_status.to_status(status)
    await context.abort(s.code, s.details, s.trailing_metadata)
    raise AssertionError("context.abort returned")  # pragma: no cover


class MalformedRequest:
    """Stands in for a request whose bytes did not parse; the handler answers INVALID_ARGUMENT."""

    def __init__(self, error: str) -> None:
        self.error = error


def well_formed(request: T | MalformedRequest) -> T:
    """The request itself, or InvalidArgument (``MALFORMED_REQUEST``) if its bytes did not parse."""
    if isinstance(request, MalformedRequest):
        raise InvalidArgument(
            f"the request is not a valid protobuf message: {request.error}",
            reason="MALFORMED_REQUEST",
        )
    return request


class SafeDecodeInterceptor(grpc.aio.ServerInterceptor):
    """Lets undecodable request bytes reach the handler as :class:`MalformedRequest`,
    so they are answered INVALID_ARGUMENT instead of grpc's UNKNOWN."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
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
