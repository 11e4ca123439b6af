"""Authentication, authorisation and rate limits of the broker's RPCs.

Every RPC except health and reflection carries ``authorization: Bearer <secret>``:

- ``rsk_…`` API keys (``ApiKey.Role``: CLIENT, OPERATOR of one farm, ADMIN), stored hashed;
- ``rswc_…`` worker credentials, issued by RegisterWorker in exchange for a farm's
  enrollment token (RegisterWorker itself is authenticated by that token).

``POLICY`` says which roles may call each method; object-level rules (a client
sees only its jobs, an operator only its farm, a worker only its attempts) are
checked by the servicers with the :class:`Principal` from :func:`current`.
"""

from __future__ import annotations

import contextvars
import secrets
from dataclasses import dataclass, field
from enum import StrEnum

from broker.errors import PermissionDenied, ResourceExhausted, Unauthenticated

__all__ = [
    "POLICY",
    "Principal",
    "RateLimiter",
    "Role",
    "current",
    "new_api_key",
]


class Role(StrEnum):
    """Who is calling; API key roles match ``rigshift.v1.ApiKey.Role``."""

    CLIENT = "CLIENT"
    OPERATOR = "OPERATOR"
    ADMIN = "ADMIN"
    WORKER = "WORKER"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    role: Role
    name: str  # client/operator/admin name, or the worker id
    farm_id: str = ""  # operators and workers

    def owns_farm(self, farm_id: str) -> bool:
        """Admins own every farm; operators their own."""
        return self.role == Role.ADMIN or (self.role == Role.OPERATOR and self.farm_id == farm_id)


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "rigshift_principal", default=None
)

C, OP, A, W = Role.CLIENT, Role.OPERATOR, Role.ADMIN, Role.WORKER
#: Roles allowed per "Service/Method"; None means the method authenticates itself.
POLICY: dict[str, frozenset[Role] | None] = {
    **{
        f"JobService/{m}": frozenset({C, A})
        for m in (
            "CreateJob",
            "GetJob",
            "ListJobs",
            "CancelJob",
            "WatchJob",
            "StreamJobLogs",
            "QuoteJob",
            "ListJobOutputs",
            "DownloadJobOutput",
        )
    },
    "FarmService/CreateFarm": frozenset({A}),
    **{
        f"FarmService/{m}": frozenset({OP, A})
        for m in (
            "GetFarm",
            "UpdateFarm",
            "ListWorkers",
            "GetEarnings",
            "ReinstateGpu",
            "CreateCurtailment",
            "ListCurtailments",
            "CancelCurtailment",
        )
    },
    # An agent going down (SIGTERM) drains itself; the servicer checks it is itself.
    "FarmService/DrainWorker": frozenset({OP, A, W}),
    "WorkerService/RegisterWorker": None,
    **{
        f"WorkerService/{m}": frozenset({W})
        for m in (
            "Heartbeat",
            "StreamInstructions",
            "ReportJobEvents",
            "ReportGpuHealth",
            "Session",
        )
    },
    "ArtifactService/UploadArtifact": frozenset({C, A, W}),
    "ArtifactService/DownloadArtifact": frozenset({C, A, W}),
    "ArtifactService/GetUploadStatus": frozenset({C, A, W}),
    **{
        f"AdminService/{m}": frozenset({A}) for m in ("CreateApiKey", "ListApiKeys", "RevokeApiKey")
    },
}


def current() -> Principal:
    """The caller of the RPC being served (set by the servicer wrapper)."""
    p = _current.get()
    if p is None:
        raise Unauthenticated("no authenticated caller")
    return p


def set_current(p: Principal | None) -> contextvars.Token[Principal | None]:
    """Bind the caller for the rest of this task (the servicer wrapper does this)."""
    return _current.set(p)


def new_api_key() -> tuple[str, str]:
    """(key id, secret) of a fresh API key."""
    return secrets.token_hex(6), "rsk_" + secrets.token_urlsafe(32)


def bearer(metadata: tuple[tuple[str, str], ...]) -> str:
    """The bearer secret in call metadata, or ""."""
    for key, value in metadata:
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return ""


def authorize(method: str, principal: Principal | None) -> None:
    """Raise unless ``principal`` may call ``method`` ("Service/Method")."""
    allowed = POLICY.get(method, frozenset())
    if allowed is None:
        return
    if principal is None:
        raise Unauthenticated(
            f"{method} needs `authorization: Bearer <key>` (see `rigshift admin create-key`)"
        )
    if principal.role not in allowed:
        roles = ", ".join(sorted(r.value.lower() for r in allowed)) or "nobody"
        raise PermissionDenied(
            f"{principal.role.value.lower()} {principal.name!r} may not call {method} "
            f"(allowed: {roles})",
            reason="ROLE_NOT_ALLOWED",
            metadata={"method": method, "role": principal.role.value},
        )


@dataclass
class RateLimiter:
    """Token bucket per principal: ``rate_per_s`` sustained, ``burst`` at once.

    ``check`` is pure given ``now``; RESOURCE_EXHAUSTED carries the seconds to wait.
    """

    rate_per_s: float = 50.0
    burst: float = 100.0
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # tokens, last

    def check(self, who: str, now: float) -> None:
        """Take one token for ``who`` or raise ResourceExhausted with the retry delay."""
        if self.rate_per_s <= 0:
            return
        tokens, last = self._buckets.get(who, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate_per_s)
        if tokens < 1.0:
            wait = (1.0 - tokens) / self.rate_per_s
            self._buckets[who] = (tokens, now)
            raise ResourceExhausted(
                f"rate limit of {self.rate_per_s:g} calls/s exceeded for {who}; "
                f"retry in {wait:.2f} s",
                reason="RATE_LIMITED",
                retry_after_s=wait,
            )
        self._buckets[who] = (tokens - 1.0, now)
