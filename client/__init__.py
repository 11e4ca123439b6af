"""Rigshift client: the Python SDK (:class:`Client`), its errors, and the ``rigshift`` CLI."""

from client.errors import (
    AlreadyExists,
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
from client.sdk import Client

__all__ = [
    "AlreadyExists",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RigshiftError",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]
