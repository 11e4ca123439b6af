"""The broker's exception tree. Everything the core, the store or validation raises
for a caller's mistake is a :class:`BrokerError`; ``broker.api`` maps it to a gRPC
status in one place (``abort_with``), and ``client.errors`` turns the status back
into the SDK's exceptions.

::

    BrokerError                      (base; carries reason + field violations)
    ├── InvalidArgument              INVALID_ARGUMENT   bad field values
    ├── NotFound                     NOT_FOUND          no such job / farm / worker / artifact
    ├── AlreadyExists                ALREADY_EXISTS     unique name taken
    ├── FailedPrecondition           FAILED_PRECONDITION  valid request, wrong moment
    │   └── InvalidTransition        (a job state change the state machine forbids)
    ├── PermissionDenied             PERMISSION_DENIED
    ├── Unauthenticated              UNAUTHENTICATED    missing or wrong credential
    ├── ResourceExhausted            RESOURCE_EXHAUSTED size or rate limits
    └── Unavailable                  UNAVAILABLE        retry later (possibly elsewhere)
        ├── StaleWriter              another broker leads now (replicas)
        └── DatabaseUnavailable      the database cannot take a write now; carries RetryInfo

The store raises ``DatabaseUnavailable`` for every database fault (unreachable, connection
lost, locked, read-only; see ``broker.store.database_error``), so a database outage is
never answered ``INTERNAL``. Anything else escaping a servicer is a bug and is answered
``INTERNAL``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

__all__ = [
    "AlreadyExists",
    "BrokerError",
    "DatabaseUnavailable",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "InvalidTransition",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StaleWriter",
    "Unauthenticated",
    "Unavailable",
]


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field: its path (``spec.gpu_count``) and what is wrong."""

    field: str
    description: str


class BrokerError(Exception):
    """Base of every error the broker reports to a caller as a non-INTERNAL status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: Sequence[FieldViolation] = (),
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.violations = tuple(violations)
        self.metadata = dict(metadata or {})


class InvalidArgument(BrokerError):
    """A request field has a value the broker cannot accept."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def of(cls, violations: Sequence[FieldViolation]) -> InvalidArgument:
        """Build one error from several violations; the message names the first."""
        first = violations[0]
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        return cls(f"{first.field}: {first.description}{more}", violations=violations)


class NotFound(BrokerError):
    """The named resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(BrokerError):
    """A resource with that unique name already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(BrokerError):
    """The request is well-formed but the system is not in a state to accept it."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class InvalidTransition(FailedPrecondition):
    """A job state change that the transition table forbids; carries the job's history."""

    default_reason = "INVALID_TRANSITION"

    def __init__(self, job_id: str, from_state: str, to_state: str, history: Sequence[str]):
        super().__init__(
            f"job {job_id} cannot go from {from_state} to {to_state}",
            metadata={"job": job_id, "from": from_state, "to": to_state},
        )
        self.job_id = job_id
        self.from_state = from_state
        self.to_state = to_state
        self.history = tuple(history)


class PermissionDenied(BrokerError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(BrokerError):
    """The call carries no credential, or one the broker does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(BrokerError):
    """A size or rate limit was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(BrokerError):
    """The broker cannot serve this now; the caller should retry (possibly elsewhere)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class StaleWriter(Unavailable):
    """Another broker changed a row this one believed it owned: this one must stop writing.

    Raised by the store when a GPU binding's compare-and-set fails (see ``docs/replicas.md``).
    """

    default_reason = "STALE_WRITER"


class DatabaseUnavailable(Unavailable):
    """The database cannot take a write now (unreachable, connection lost, locked, read-only).

    ``reason`` says which: ``DATABASE_UNAVAILABLE``, ``DATABASE_LOCKED`` or
    ``DATABASE_READ_ONLY``. The answer carries ``google.rpc.RetryInfo`` with
    ``retry_after_s`` (``broker.api.abort_with`` adds it, as for rate limits).
    """

    default_reason = "DATABASE_UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        retry_after_s: float = 1.0,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            message,
            reason=reason,
            metadata={**(metadata or {}), "retry_after_s": f"{retry_after_s:.3f}"},
        )
        self.retry_after_s = retry_after_s
