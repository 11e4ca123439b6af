"""The leader's side of the followers' lease digests: ``rigshift.v1.ReplicaService``.

A follower that holds agent sessions (``broker.replica_sessions``) renews their leases
on the leader with one ``RenewLeases`` call per heartbeat interval. The leader turns the
digest into ``Heartbeat`` events — in-memory core events, the same ones a unary
Heartbeat makes — and handles them in ONE ``BrokerService.apply``.

Only replicas may call it: the service is added to the leader's internal port only
(the public ports forward nothing but the public API), and every call must carry
``authorization: Bearer <secret>`` with the secret this leader wrote to its
``broker_leader`` row at election (a fresh one every epoch; docs/replicas.md).
"""

from __future__ import annotations

import hmac
import logging
import re

import grpc
from prometheus_client import CollectorRegistry, Counter

from broker import validation as v
from broker.api.boundary import abort_with
from broker.auth import bearer
from broker.convert import timestamp
from broker.errors import BrokerError, FieldViolation, InvalidArgument, Unauthenticated
from broker.events import Heartbeat
from broker.service import BrokerService
from rigshift.v1 import replica_service_pb2, replica_service_pb2_grpc, worker_service_pb2

__all__ = ["DigestMetrics", "ReplicaServicer", "status_entries"]

log = logging.getLogger("rigshift.broker.replica")

_SHA = re.compile(r"^[0-9a-f]{64}$")
MAX_RENEWALS = 100_000
"""Largest digest accepted (one follower's agents)."""


class DigestMetrics:
    """Counters of the digest path, on the replica's registry (created once per process)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.digests = Counter(
            "rigshift_broker_replica_lease_digests",
            "RenewLeases digests this replica handled while leading.",
            registry=registry,
        )
        self.renewals = Counter(
            "rigshift_broker_replica_lease_renewals",
            "Worker leases renewed through followers' digests while leading.",
            registry=registry,
        )


def status_entries(status: worker_service_pb2.WorkerStatus) -> tuple[str, ...]:
    """What a Heartbeat event carries of a rig's status: its environments' sha256 and its
    image references, at most 64 and 128 (entries that are not valid are dropped: a
    digest must not fail for one rig's odd entry)."""
    envs = tuple(e for e in status.environments[:64] if _SHA.match(e))
    images = tuple(ref for ref in status.images[:128] if ref and not v.check_image(ref))
    return envs + images


class ReplicaServicer(replica_service_pb2_grpc.ReplicaServiceServicer):
    """rigshift.v1.ReplicaService on a leader's internal port."""

    def __init__(
        self, svc: BrokerService, secret: str, lease_ttl_s: float, metrics: DigestMetrics
    ) -> None:
        self.svc = svc
        self._secret = secret
        self.lease_ttl_s = lease_ttl_s
        self.metrics = metrics

    async def RenewLeases(
        self, request: replica_service_pb2.RenewLeasesRequest, context: grpc.aio.ServicerContext
    ) -> replica_service_pb2.RenewLeasesResponse:
        """Renew every known worker in the digest in one apply; unknown ones are marked."""
        try:
            given = bearer(tuple((k, str(val)) for k, val in context.invocation_metadata() or ()))
            if not self._secret or not hmac.compare_digest(given, self._secret):
                raise Unauthenticated(
                    "ReplicaService needs this leader's replica secret (broker_leader row)",
                    reason="BAD_REPLICA_SECRET",
                )
            if len(request.renewals) > MAX_RENEWALS:
                raise InvalidArgument.of(
                    [FieldViolation("renewals", f"at most {MAX_RENEWALS} per digest")]
                )
            return await self._renew(request)
        except BrokerError as err:
            await abort_with(context, err)

    async def _renew(
        self, request: replica_service_pb2.RenewLeasesRequest
    ) -> replica_service_pb2.RenewLeasesResponse:
        core = self.svc.core
        now = self.svc.clock()
        events = [
            Heartbeat(now, r.worker_id, status_entries(r.status) if r.HasField("status") else None)
            for r in request.renewals
            if r.worker_id in core.workers
        ]
        if events:
            await self.svc.apply(*events)  # heartbeats only: in memory, one lock round
        self.metrics.digests.inc()
        self.metrics.renewals.inc(len(events))
        out = replica_service_pb2.RenewLeasesResponse(lease_ttl_seconds=int(self.lease_ttl_s))
        for r in request.renewals:
            worker = core.workers.get(r.worker_id)
            if worker is None:
                out.leases.add(worker_id=r.worker_id, unknown=True)
                continue
            out.leases.add(
                worker_id=r.worker_id,
                lease_expire_time=timestamp(worker.lease_expires_at),
                status_wanted=worker.environments is None,
            )
        return out
