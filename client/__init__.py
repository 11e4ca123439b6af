"""Rigshift client: the Python SDK (:class:`Client`), its errors, and the CLI's job and farm
groups (:mod:`client.cli`; the ``rigshift`` command that adds them is :mod:`rigshift_cli`).

The SDK has no dependency on the broker or the agent packages.
"""

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
