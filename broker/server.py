"""The broker process: gRPC server, health, reflection, background loops (the shell's outer layer).

``Broker`` follows the daemon contract of STYLE.md 6: ``start()`` binds and
returns, ``stop()`` drains in-flight RPCs and is safe to call twice, and
``async with Broker(config)`` does both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from broker.api import (
    AdminServicer,
    ArtifactServicer,
    FarmServicer,
    JobServicer,
    SafeDecodeInterceptor,
    WorkerServicer,
)
from broker.artifacts import DEFAULT_MAX_INPUT_BYTES, DEFAULT_MAX_OUTPUT_BYTES, ArtifactStore
from broker.auth import RateLimiter, Role
from broker.clock import BrokerClock
from broker.core import BrokerCore
from broker.metrics import BrokerMetrics, FarmNames, default_registry
from broker.metrics_http import MetricsServer
from broker.policy import QUEUE_POLICIES
from broker.retention import retention_loop
from broker.service import BrokerService
from broker.store import Store
from rigshift.defaults import (
    BROKER_ADDRESS,
    BROKER_MIN_PING_INTERVAL_S,
    HEARTBEAT_INTERVAL_S,
    HEARTBEATS_PER_TTL,
    LEASE_TTL_S,
)
from rigshift.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    farm_service_pb2,
    farm_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

__all__ = [
    "KEEPALIVE_OPTIONS",
    "SERVER_TIME_KEY",
    "SERVICE_NAMES",
    "Broker",
    "BrokerConfig",
    "HealthWithTime",
    "bind",
    "server_credentials",
]

log = logging.getLogger("rigshift.broker")

SERVICE_NAMES = (
    job_service_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    farm_service_pb2.DESCRIPTOR.services_by_name["FarmService"].full_name,
    artifact_service_pb2.DESCRIPTOR.services_by_name["ArtifactService"].full_name,
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


@dataclass(frozen=True)
class BrokerConfig:
    """Settings of one broker process."""

    listen: str = BROKER_ADDRESS
    """host:port for gRPC; port 0 picks a free port."""
    home: str = ".rigshift"
    """Directory for the default SQLite database and the artifact store."""
    db_url: str = ""
    """SQLAlchemy URL; empty means ``sqlite:///<home>/broker.db``."""
    artifact_dir: str = ""
    """Where uploaded archives live; empty means ``<home>/artifacts``."""
    lease_ttl_s: float = LEASE_TTL_S
    """A worker that has not renewed its lease for this long is offline."""
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    """How often agents are told to renew (must be well under the TTL)."""
    default_max_attempts: int = 3
    """Attempts a job gets when its spec does not say."""
    spot_permille: int = 600
    """Spot jobs pay this share of the ask, in thousandths (600 = 60%)."""
    start_deadline_s: float = 60.0
    """A guaranteed job that starts later than this after submission earns a credit."""
    broker_fee_permille: int = 100
    """The broker's fee for farms that do not set one, thousandths of each charge."""
    max_message_bytes: int = 4 << 20
    """Largest gRPC message accepted."""
    max_artifact_bytes: int = 100 << 20
    """Largest uploaded working directory or checkpoint archive."""
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    """Largest uploaded input archive (``JobSpec.inputs``)."""
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    """Largest output archive kept per attempt (agents are told it with each assignment)."""
    artifact_retention_days: int = 30
    """Archives older than this that no job needs are removed (hourly); 0: keep everything."""
    grace_s: float = 5.0
    """How long stop() lets in-flight RPCs finish."""
    rate_limit_per_s: float = 50.0
    """Calls per second each client or operator key may make (burst: twice that); 0: off."""
    tls_cert: str = ""
    """PEM certificate chain for TLS on the gRPC port; empty: plaintext."""
    tls_key: str = ""
    """PEM private key matching ``tls_cert``."""
    tls_client_ca: str = ""
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""
    write_credentials: bool = True
    """On first start, write the new admin key to ``$RIGSHIFT_HOME/credentials``."""
    metrics_listen: str = ""
    """host:port for ``/metrics`` and ``/sd`` (Prometheus); empty: off; port 0 picks a free port."""
    queue_policy: str = "fifo"
    """Order of pending jobs: ``fifo`` or ``short-first`` (``broker.policy.QUEUE_POLICIES``)."""
    curtailment_lead_s: float = 3600.0
    """How long before a farm's curtailment window a job without a declared
    ``max_duration_seconds`` stops being placed there (``broker.curtailment``)."""
    db_outage_unhealthy_s: float = 60.0
    """The health service reports NOT_SERVING once the database has been unable to take a
    write for this long (SERVING again when it is back); 0: never."""

    def __post_init__(self) -> None:
        if self.queue_policy not in QUEUE_POLICIES:
            raise ValueError(f"queue_policy must be one of {', '.join(QUEUE_POLICIES)}")
        if self.db_outage_unhealthy_s < 0:
            raise ValueError("db_outage_unhealthy_s must be >= 0 (0: never unhealthy)")
        if self.heartbeat_interval_s * HEARTBEATS_PER_TTL > self.lease_ttl_s:
            raise ValueError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be at most "
                f"lease_ttl_s ({self.lease_ttl_s}) / {HEARTBEATS_PER_TTL} so one lost heartbeat "
                "cannot expire a lease"
            )

    def resolved_db_url(self) -> str:
        """The database URL, defaulting to SQLite under ``home``."""
        if self.db_url:
            return self.db_url
        Path(self.home).mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{Path(self.home) / 'broker.db'}"


KEEPALIVE_OPTIONS = (
    # Ping each client after 30 s without a frame from it; no answer within 10 s closes the
    # connection, so the streams of a rig whose link went silent end within 40 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # instruction streams are silent for hours
    # Accept client pings every 5 s (agents ping every 10 s: worker_agent.config's
    # keepalive_time_s, at least BROKER_MIN_PING_INTERVAL_S). Pings closer than this are
    # strikes; after max_ping_strikes (2) the client gets GOAWAY too_many_pings.
    ("grpc.http2.min_ping_interval_without_data_ms", round(BROKER_MIN_PING_INTERVAL_S * 1000)),
    ("grpc.http2.max_ping_strikes", 2),
)
"""gRPC keepalive of the broker's public port (docs/reliability.md, "Faults")."""


SERVER_TIME_KEY = "rigshift-server-time"
"""Initial metadata of every health check: the broker's clock (Unix seconds), for
``rigshift agent doctor``'s clock-skew check; reading it has no side effects."""


HEALTH_WATCH_INTERVAL_S = 0.5
"""How often the broker compares the database outage with ``db_outage_unhealthy_s``."""


class HealthWithTime(health.aio.HealthServicer):
    """The standard health service, plus the broker's time in the initial metadata."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.clock = clock

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        await context.send_initial_metadata(((SERVER_TIME_KEY, f"{self.clock():.6f}"),))
        return await super().Check(request, context)


def server_credentials(cfg: BrokerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port from the config; None for plaintext."""
    if not cfg.tls_cert:
        return None
    return grpc.ssl_server_credentials(
        [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
        root_certificates=Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None,
        require_client_auth=bool(cfg.tls_client_ca),
    )


def bind(server: grpc.aio.Server, cfg: BrokerConfig) -> int:
    """Add ``cfg.listen`` to the server, with TLS when configured; the port it got."""
    creds = server_credentials(cfg)
    if creds is not None:
        port = server.add_secure_port(cfg.listen, creds)
    else:
        port = server.add_insecure_port(cfg.listen)
    if port == 0:
        raise OSError(f"cannot listen on {cfg.listen}")
    return port


class Broker:
    """One broker: store, core, servicers and loops. Use ``async with`` or start()/stop()."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        registry: CollectorRegistry | None = None,
        add_services: Callable[[BrokerService, grpc.aio.Server], None] | None = None,
        metric_snapshot: bool = True,
    ) -> None:
        """``metric_snapshot``: start the metrics from the totals a cleanly stopped broker
        left, and leave them at a clean stop (off for replicas: another may lead by then)."""
        self.config = config
        self._metric_snapshot = metric_snapshot
        self._add_services = add_services  # more servicers (a replica leader's ReplicaService)
        self.port = 0
        self.registry = registry if registry is not None else default_registry()
        self.metrics: BrokerMetrics | None = None
        self._metrics_server: MetricsServer | None = None
        self.store: Store | None = None
        self.service: BrokerService | None = None
        self.artifacts: ArtifactStore | None = None
        self._retention: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._health_watch: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.admin_key = ""  # set when this start created the first admin key

    @property
    def address(self) -> str:
        """host:port the server is bound to."""
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        """host:port of ``/metrics`` and ``/sd``; empty when ``metrics_listen`` is off."""
        return self._metrics_server.address if self._metrics_server is not None else ""

    async def start(self) -> None:
        """Open the store, rebuild the core from it, bind and serve."""
        cfg = self.config
        self.store = Store(cfg.resolved_db_url())
        core = BrokerCore(
            lease_ttl_s=cfg.lease_ttl_s,
            default_max_attempts=cfg.default_max_attempts,
            spot_permille=cfg.spot_permille,
            start_deadline_s=cfg.start_deadline_s,
            default_fee_permille=cfg.broker_fee_permille,
            queue_policy=QUEUE_POLICIES[cfg.queue_policy],
            curtailment_lead_s=cfg.curtailment_lead_s,
            keep_ledger=False,  # the store holds the ledger (broker.store.ledger_sql)
        )
        clock = BrokerClock()
        self.store.load(core, now=clock())
        store = self.store
        farm_name = FarmNames(lambda farm_id: store.get_farm(farm_id).display_name)
        # A clean stop left the metrics' totals over history: no need to sum every finished
        # job and ledger leg again (that grew the restart by ~0.3 s per 100,000 jobs).
        figures = self._take_metric_snapshot()
        history = store.history_totals() if figures is None else None
        metrics = self.metrics = BrokerMetrics(
            core, self.registry, farm_name=farm_name, history=history, figures=figures
        )
        svc = self.service = BrokerService(
            core, self.store, clock=clock, metrics=metrics, farm_names=farm_name
        )
        svc.rate_limiter = RateLimiter(cfg.rate_limit_per_s, 2 * cfg.rate_limit_per_s)
        if cfg.metrics_listen:
            self._metrics_server = MetricsServer(self.registry, metrics.sd_targets)
            await self._metrics_server.start(cfg.metrics_listen)
        artifacts = self.artifacts = ArtifactStore(
            cfg.artifact_dir or Path(cfg.home) / "artifacts",
            cfg.max_artifact_bytes,
            max_input_bytes=cfg.max_input_bytes,
            max_output_bytes=cfg.max_output_bytes,
        )
        svc.max_output_bytes = artifacts.max_output_bytes
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *KEEPALIVE_OPTIONS,
        ]
        server = self._server = grpc.aio.server(
            options=options, interceptors=[metrics.interceptor(), SafeDecodeInterceptor()]
        )
        job_service_pb2_grpc.add_JobServiceServicer_to_server(
            JobServicer(svc, cfg.default_max_attempts, artifacts), server
        )
        farm_service_pb2_grpc.add_FarmServiceServicer_to_server(FarmServicer(svc), server)
        worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(svc, cfg.lease_ttl_s, cfg.heartbeat_interval_s), server
        )
        artifact_service_pb2_grpc.add_ArtifactServiceServicer_to_server(
            ArtifactServicer(svc, artifacts), server
        )
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(svc), server)
        if self._add_services is not None:
            self._add_services(svc, server)
        self._health = HealthWithTime(clock)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = bind(server, cfg)
        await server.start()
        self._first_admin_key(svc)
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        svc.start_loops(tick_interval_s=min(1.0, cfg.lease_ttl_s / 4))
        self._health_watch = asyncio.create_task(self._watch_database(svc), name="rigshift-health")
        if cfg.artifact_retention_days > 0:
            self._retention = asyncio.create_task(
                retention_loop(
                    core,
                    artifacts,
                    cfg.artifact_retention_days * 86400.0,
                    stored=self.store.recent_artifacts,
                ),
                name="rigshift-artifact-retention",
            )
        log.info(
            "broker serving on %s (db %s, %d jobs, %d workers loaded)",
            self.address,
            self.store.url,
            len(core.jobs),
            len(core.workers),
        )

    async def _watch_database(self, svc: BrokerService) -> None:
        """NOT_SERVING once the database has been away for ``db_outage_unhealthy_s`` (so an
        orchestrator replaces a broker that would otherwise serve stale state for good),
        SERVING again as soon as it takes writes."""
        assert self._health is not None
        limit = self.config.db_outage_unhealthy_s
        serving = True
        while True:
            await asyncio.sleep(HEALTH_WATCH_INTERVAL_S)
            down = svc.database_down_for()
            healthy = down is None or limit <= 0 or down < limit
            if healthy == serving:
                continue
            serving = healthy
            if healthy:
                log.info("database back: health SERVING")
            else:
                log.error("database away for %.0f s: health NOT_SERVING", down)
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if healthy
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", *SERVICE_NAMES):
                await self._health.set(name, status)

    def _first_admin_key(self, svc: BrokerService) -> None:
        """Create an admin key when the database has none, and save it for the local CLI."""
        if any(r.role == Role.ADMIN.value and not r.revoked for r in svc.store.api_keys()):
            return
        _, self.admin_key = svc.create_api_key(Role.ADMIN, "admin")
        if self.config.write_credentials:
            from rigshift.credentials import save_api_key

            path = save_api_key(self.address, self.admin_key)
            log.info("created the first admin key; saved to %s", path)
        else:
            log.info("created the first admin key (not saved: write_credentials is off)")

    async def stop(self) -> None:
        """Stop accepting RPCs, let in-flight ones finish within the grace period, close the store.

        Safe to call more than once.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            if self._health_watch is not None:
                self._health_watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._health_watch
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            if self._retention is not None:
                self._retention.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._retention
            if self.service is not None:
                await self.service.stop_loops()
            if self._server is not None:
                await self._server.stop(self.config.grace_s)
            if self._metrics_server is not None:
                await self._metrics_server.stop()
            self._leave_metric_snapshot()
            if self.store is not None:
                self.store.close()
        finally:
            self._stopped.set()

    def _take_metric_snapshot(self) -> str | None:
        """The totals a clean stop left, taken (deleted); None, and summed from the tables
        instead, when there are none or the database will not let them be taken (a
        read-only file still serves reads: a snapshot left in place could go stale)."""
        if not self._metric_snapshot or self.store is None:
            return None
        try:
            return self.store.take_metric_snapshot()
        except Exception as err:
            log.warning("metric snapshot not taken (%s): summing the totals instead", err)
            return None

    def _leave_metric_snapshot(self) -> None:
        """After the last write: the metrics' totals for the next broker, when everything
        the core counted is stored (no outage, nothing waiting, still leading)."""
        svc, store, metrics = self.service, self.store, self.metrics
        if not self._metric_snapshot or svc is None or store is None or metrics is None:
            return
        if not svc.all_stored():
            log.warning("not all changes are stored: the next start sums the metrics' totals")
            return
        try:
            store.leave_metric_snapshot(metrics.fleet.tally.figures(), time.time())
        except Exception as err:  # the next start sums them from the tables instead
            log.warning("metric snapshot not written (%s)", err)

    async def wait_closed(self) -> None:
        """Return once stop() has completed."""
        await self._stopped.wait()

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
