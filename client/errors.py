"""Exceptions raised by the Rigshift client SDK.

Every failed RPC is turned into exactly one of these, chosen by its gRPC status
code; the SDK also raises them itself for mistakes it can catch before calling
the broker (e.g. a working directory over the upload limit)::

    RigshiftError                 anything that went wrong talking to the broker
    ├── InvalidArgument           INVALID_ARGUMENT, OUT_OF_RANGE: fix the request
    ├── NotFound                  NOT_FOUND: no such job, farm, worker or artifact
    ├── AlreadyExists             ALREADY_EXISTS: e.g. a farm name taken
    ├── FailedPrecondition        FAILED_PRECONDITION: not allowed in this state
    ├── PermissionDenied          PERMISSION_DENIED
    ├── Unauthenticated           UNAUTHENTICATED: missing or bad credential
    ├── ResourceExhausted         RESOURCE_EXHAUSTED: a quota or size limit
    ├── Unavailable               UNAVAILABLE: broker unreachable or shutting down
    ├── DeadlineExceeded          DEADLINE_EXCEEDED: the call ran past its timeout
    └── InternalError             any other code (INTERNAL, UNKNOWN, ABORTED, ...)

Each carries the decoded rich status the broker sends (``google.rpc.Status``
with ``ErrorInfo``, ``BadRequest`` and ``RetryInfo`` details): ``code``, ``message``,
``reason`` (a stable UPPER_SNAKE string to branch on, ``""`` if absent),
``metadata`` (``ErrorInfo.metadata``), ``field_violations`` as
``(field, description)`` pairs and ``retry_after_s`` (None without ``RetryInfo``).
A ``create_job`` that failed sets ``request_id``: retrying with it can never make
a second job. ``str(exc)`` is one readable line, e.g.
``INVALID_ARGUMENT: spec.gpu_count: must be between 1 and 64 (got 0)``.

The class follows the code; ``reason`` says more. Those of artifact transfers::

    ResourceExhausted   ARTIFACT_TOO_LARGE       over the purpose's limit (metadata limit_bytes)
                        ARTIFACT_STORE_FULL      the broker's disk is full; nothing was kept
    Unavailable         DATABASE_UNAVAILABLE     the broker's database is away (retry_after_s)
                        DATABASE_LOCKED          SQLite locked by another process (retry_after_s)
                        DATABASE_READ_ONLY       the database takes no writes now (retry_after_s)
    FailedPrecondition  UPLOAD_OFFSET_MISMATCH   resume offset != kept bytes (received_bytes)
                        UPLOAD_IN_PROGRESS       the same sha256 is being uploaded; retry
                        OUTPUT_OVER_LIMIT        that attempt's output was too large to keep
    PermissionDenied    OUTPUT_UPLOAD_NOT_ALLOWED  only agents upload outputs
                        NOT_YOUR_ARTIFACT        no job of the caller refers to the archive
    NotFound            NO_OUTPUT                the attempt (or job) kept no output
                        OUTPUT_EXPIRED           removed after the retention period
    InvalidArgument     DOWNLOAD_DIR_NOT_EMPTY   (raised by the SDK) the target has files
    Unavailable         UPLOAD_STALLED           (SDK) five tries in a row moved nothing
    InternalError       OUTPUT_DIGEST_MISMATCH   (SDK, code DATA_LOSS) a corrupt download

The upload and download methods of :class:`client.sdk.Client` already retry
UNAVAILABLE, UPLOAD_OFFSET_MISMATCH and UPLOAD_IN_PROGRESS themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "AlreadyExists",
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


class RigshiftError(Exception):
    """Base of every client error; see the module docstring for the tree."""

    #: The status code this class stands for; an instance may carry a more precise one.
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        retry_after_s: float | None = None,
    ) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        #: How long the broker asks the caller to wait before a retry (``google.rpc.RetryInfo``).
        self.retry_after_s: float | None = retry_after_s
        #: The idempotency key of a create that failed (retry with it to get the same job).
        self.request_id: str = ""
        self.message: str = message
        self.reason: str = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        super().__init__(message)

    def __str__(self) -> str:
        one_line = " ".join(self.message.split()) or "(no message)"
        return f"{self.code.name}: {one_line}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, message={self.message!r}, "
            f"reason={self.reason!r}, field_violations={self.field_violations!r})"
        )


class InvalidArgument(RigshiftError):
    """The request is malformed; ``field_violations`` says which fields and why."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RigshiftError):
    """The named job, farm, worker or artifact does not exist."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RigshiftError):
    """The resource to create exists already (e.g. a farm display name)."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(RigshiftError):
    """The request is valid but not allowed in the resource's current state."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(RigshiftError):
    """The caller may not do this."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(RigshiftError):
    """The call carried no valid credential."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(RigshiftError):
    """A quota or size limit was hit."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RigshiftError):
    """The broker could not be reached, or is shutting down; retrying may help."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RigshiftError):
    """The call did not finish within its timeout."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(RigshiftError):
    """Any other status: a broker bug, an unknown error, an aborted call."""

    default_code = grpc.StatusCode.INTERNAL


_CLASS_BY_CODE: dict[grpc.StatusCode, type[RigshiftError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(err: grpc.RpcError) -> RigshiftError:
    """Turn a failed call into the matching :class:`RigshiftError` subclass.

    Reads the code and message from the call, and ``ErrorInfo`` and
    ``BadRequest`` from the ``grpc-status-details-bin`` trailer when present.
    Never raises: an error without a call interface or with an inconsistent
    rich status still gives a usable exception.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        return InternalError(str(err) or type(err).__name__, code=grpc.StatusCode.UNKNOWN)
    message = (details_fn() if callable(details_fn) else None) or ""

    reason = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry_after_s: float | None = None
    try:
        status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    except (ValueError, TypeError):  # rich status inconsistent with the call: ignore it
        status = None
    if status is not None:
        message = message or status.message
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend((v.field, v.description) for v in bad.field_violations)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after_s = retry.retry_delay.ToTimedelta().total_seconds()

    cls = _CLASS_BY_CODE.get(code, InternalError)
    return cls(
        message,
        code=code,
        reason=reason,
        metadata=metadata,
        field_violations=violations,
        retry_after_s=retry_after_s,
    )
