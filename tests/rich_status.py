"""Rich gRPC statuses the way the broker builds them (ErrorInfo, then BadRequest), for the
SDK's error tests with and without a server. Import as ``from rich_status import rich_status``
(tests/ is on sys.path)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = ["packed", "rich_status"]


def packed(msg: object) -> any_pb2.Any:
    """``msg`` in a ``google.protobuf.Any``."""
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
        details.append(packed(info))
    if violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in violations
            ]
        )
        details.append(packed(bad))
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))
