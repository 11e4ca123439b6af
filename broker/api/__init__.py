"""gRPC servicers: turn RPCs into core events and core state into messages.

One module per service of ``rigshift/v1/*_service.proto``:

- ``jobs``       JobService       (clients: submit, watch, cancel, quote, outputs)
- ``farms``      FarmService      (operators: farms, workers, earnings)
- ``workers``    WorkerService    (agents: register, heartbeat, instructions, reports)
- ``artifacts``  ArtifactService  (working directories, checkpoints, inputs, outputs)
- ``admin``      AdminService     (API keys)

``boundary`` is where errors cross to the wire (the only module that knows gRPC status
codes); ``common`` admits calls, scopes what a caller may see and pages lists.
"""

from __future__ import annotations

from broker.api.admin import AdminServicer
from broker.api.artifacts import ArtifactServicer
from broker.api.boundary import (
    ERROR_DOMAIN,
    STATUS_CODES,
    SafeDecodeInterceptor,
    abort_with,
    status_code,
    to_status,
)
from broker.api.farms import FarmServicer
from broker.api.jobs import JobServicer
from broker.api.workers import WorkerServicer

__all__ = [
    "ERROR_DOMAIN",
    "STATUS_CODES",
    "AdminServicer",
    "ArtifactServicer",
    "FarmServicer",
    "JobServicer",
    "SafeDecodeInterceptor",
    "WorkerServicer",
    "abort_with",
    "status_code",
    "to_status",
]
