"""The broker's exception tree: plain Python exceptions, no transport in sight.

Everything the core, the store, the artifact store or validation raises for a caller's
mistake (or for a moment the broker cannot serve) is a :class:`BrokerError`. An error is
plain data: a message, a stable UPPER_SNAKE ``reason``, string ``metadata``, the invalid
request fields (``violations``) and, when the caller should wait before a retry,
``retry_after_s``. Which gRPC status each class stands for is decided at the API
boundary only (``broker.api.boundary``), and ``client.errors`` turns the status back
into the SDK's exceptions.

::

    BrokerError                    (base; reason, metadata, violations, retry_after_s)
    ├── InvalidArgument            bad field values (``InvalidArgument.of(violations)``)
    ├── NotFound                   no such job / farm / worker / artifact / API key
    ├── AlreadyExists              unique name taken
    ├── FailedPrecondition         valid request, wrong moment
    │   └── InvalidTransition      a job state change the transition table forbids
    ├── PermissionDenied           the caller is known but may not do this
    ├── Unauthenticated            missing or wrong credential
    ├── ResourceExhausted          size or rate limits (rate limits carry retry_after_s)
    └── Unavailable                retry later (possibly elsewhere)
        ├── StaleWriter            another broker leads now (replicas)
        └── DatabaseUnavailable    the database cannot take a write now (retry_after_s)

The store raises ``DatabaseUnavailable`` for every database fault (unreachable, connection
lost, locked, read-only; see ``broker.store.database_error``), so a database outage is
never answered ``INTERNAL``. Anything else escaping a servicer is a bug and is answered
``INTERNAL``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
    """Base of every error the broker reports to a caller as a non-INTERNAL status.

    ``retry_after_s``, when given, is kept to the millisecond and also stated in
    ``metadata["retry_after_s"]`` (last), as the caller sees it.
    """

    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.violations = tuple(violations)
        self.metadata = dict(metadata or {})
        self.retry_after_s: float | None = None
        if retry_after_s is not None:
            stated = f"{retry_after_s:.3f}"
            self.metadata["retry_after_s"] = stated
            self.retry_after_s = float(stated)


class InvalidArgument(BrokerError):
    """A request field has a value the broker cannot accept."""

    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def of(cls, violations: Sequence[FieldViolation]) -> InvalidArgument:
        """Build one error from several violations; the message names the first."""
        first = violations[0]
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        return cls(f"{first.field}: {first.description}{more}", violations=violations)


class NotFound(BrokerError):
    """The named resource does not exist."""

    default_reason = "NOT_FOUND"


class AlreadyExists(BrokerError):
    """A resource with that unique name already exists."""

    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(BrokerError):
    """The request is well-formed but the system is not in a state to accept it."""

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

    default_reason = "PERMISSION_DENIED"


class Unauthenticated(BrokerError):
    """The call carries no credential, or one the broker does not know."""

    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(BrokerError):
    """A size or rate limit was hit (a rate limit says when to retry)."""

    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(BrokerError):
    """The broker cannot serve this now; the caller should retry (possibly elsewhere)."""

    default_reason = "UNAVAILABLE"


class StaleWriter(Unavailable):
    """Another broker changed a row this one believed it owned: this one must stop writing.

    Raised by the store when a GPU binding's compare-and-set fails (see ``docs/replicas.md``).
    """

    default_reason = "STALE_WRITER"


class DatabaseUnavailable(Unavailable):
    """The database cannot take a write now (unreachable, connection lost, locked, read-only).

    ``reason`` says which: ``DATABASE_UNAVAILABLE``, ``DATABASE_LOCKED`` or
    ``DATABASE_READ_ONLY``; ``retry_after_s`` (1 s unless said) is always set.
    """

    default_reason = "DATABASE_UNAVAILABLE"
    retry_after_s: float

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        retry_after_s: float = 1.0,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata, retry_after_s=retry_after_s)
