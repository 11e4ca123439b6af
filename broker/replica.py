"""Broker replicas on one PostgreSQL: every replica serves, one of them leads.

The core is a single-writer state machine (STYLE.md 1), so replicas do not share
it; they share the *entry points* and take turns owning it (``docs/replicas.md``):

- Every replica binds the public gRPC port and answers the health service
  itself. Every other method is forwarded, as raw bytes with its metadata and
  deadline, to the leader's internal port (the leader forwards to itself over
  loopback). Clients and agents can therefore use any replica.
- The leader is the replica that holds the PostgreSQL advisory lock
  ``LEADER_LOCK`` on a connection of its own. It runs the whole broker (core,
  scheduler, lease loop) on ``internal_listen`` and records its address and an
  epoch in the ``broker_leader`` row, where followers look it up.
- A follower serves its agents' ``WorkerService/Session`` itself
  (``broker.replica_sessions``): renewals are answered locally and reach the leader as
  one ``ReplicaService/RenewLeases`` digest per interval (``broker.replica_leases``,
  authenticated with the secret of the leader's epoch in ``broker_leader``).
- When the leader dies, PostgreSQL ends its session and so releases the lock. A
  follower polling ``pg_try_advisory_lock`` gets it, loads the state from the
  database (the same path as a restart after ``kill -9``) and leads. Streams
  forwarded to the old leader end with UNAVAILABLE; agents and watchers
  reconnect, as they do after any broker restart.
- Fencing: a leader whose lock connection fails, or whose store finds a GPU row
  changed by someone else (``StaleWriter``), stops serving at once and the
  replica ends (its supervisor restarts it as a follower). GPU bindings are
  written compare-and-set, so even two leaders overlapping for a moment cannot
  bind one GPU twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client import CollectorRegistry, Gauge
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from broker.metrics import default_registry, most_common_model
from broker.metrics_http import MetricsServer
from broker.replica_leases import DigestMetrics, ReplicaServicer
from broker.replica_sessions import SESSION_METHOD, FollowerSessions, Leader
from broker.server import (
    KEEPALIVE_OPTIONS,
    SERVICE_NAMES,
    Broker,
    BrokerConfig,
    HealthWithTime,
    bind,
)
from broker.service import BrokerService
from broker.store import Store
from rigshift.v1 import (
    admin_service_pb2,
    artifact_service_pb2,
    farm_service_pb2,
    job_service_pb2,
    replica_service_pb2_grpc,
    worker_service_pb2,
)

__all__ = ["LEADER_LOCK", "ReplicaBroker", "method_kinds"]

log = logging.getLogger("rigshift.broker.replica")

LEADER_LOCK = 0x52494C44  # "RILD": the advisory lock key of the scheduler leader
SD_REFRESH_S = 10.0
"""A follower re-reads the agents' exporters for ``/sd`` from the database this often."""

_FILES = (
    job_service_pb2,
    worker_service_pb2,
    farm_service_pb2,
    artifact_service_pb2,
    admin_service_pb2,
    reflection_pb2,
)
#: Metadata that belongs to the hop, not to the call.
_HOP_HEADERS = frozenset({"user-agent", "content-type", "te", "host"})


def method_kinds() -> dict[str, tuple[bool, bool]]:
    """``/package.Service/Method`` → (client streaming, server streaming), every forwarded RPC."""
    kinds = {}
    for module in _FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                kinds[f"/{service.full_name}/{m.name}"] = (m.client_streaming, m.server_streaming)
    return kinds


def _forwardable(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (k, v)
        for k, v in (context.invocation_metadata() or ())
        if not k.startswith((":", "grpc-")) and k not in _HOP_HEADERS
    )


async def _relay(err: grpc.aio.AioRpcError, context: grpc.aio.ServicerContext) -> None:
    """End this call with the leader's status, details and trailers (rich error details)."""
    trailers = tuple((k, v) for k, v in (err.trailing_metadata() or ()))
    await context.abort(err.code(), err.details() or "", trailers)


class _Forwarder(grpc.GenericRpcHandler):
    """Forwards every known method to the current leader, bytes in and bytes out, except
    those ``local`` serves on this replica (a follower's agent sessions)."""

    def __init__(
        self,
        leader: Callable[[], grpc.aio.Channel | None],
        local: Callable[[str], grpc.RpcMethodHandler | None] = lambda method: None,
    ) -> None:
        self._leader = leader
        self._local = local
        self._kinds = method_kinds()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        handler = self._local(method)
        if handler is not None:
            return handler
        kind = self._kinds.get(method)
        if kind is None:
            return None  # UNIMPLEMENTED, as on a single broker
        match kind:
            case (False, False):
                return grpc.unary_unary_rpc_method_handler(self._unary(method))
            case (False, True):
                return grpc.unary_stream_rpc_method_handler(self._server_stream(method))
            case (True, False):
                return grpc.stream_unary_rpc_method_handler(self._client_stream(method))
            case _:
                return grpc.stream_stream_rpc_method_handler(self._bidi(method))

    async def _channel(self, context: grpc.aio.ServicerContext) -> grpc.aio.Channel:
        channel = self._leader()
        if channel is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "no broker replica leads right now; retry shortly"
            )
        assert channel is not None
        return channel

    def _unary(self, method: str) -> Callable[..., Any]:
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            channel = await self._channel(context)
            try:
                return await channel.unary_unary(method)(
                    request, metadata=_forwardable(context), timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as err:
                await _relay(err, context)
                raise

        return call

    def _client_stream(self, method: str) -> Callable[..., Any]:
        async def call(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            channel = await self._channel(context)
            try:
                return await channel.stream_unary(method)(
                    requests, metadata=_forwardable(context), timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as err:
                await _relay(err, context)
                raise

        return call

    def _server_stream(self, method: str) -> Callable[..., Any]:
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            channel = await self._channel(context)
            upstream = channel.unary_stream(method)(
                request, metadata=_forwardable(context), timeout=context.time_remaining()
            )
            async for item in self._pipe(upstream, context):
                yield item

        return call

    def _bidi(self, method: str) -> Callable[..., Any]:
        async def call(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            channel = await self._channel(context)
            upstream = channel.stream_stream(method)(
                requests, metadata=_forwardable(context), timeout=context.time_remaining()
            )
            async for item in self._pipe(upstream, context):
                yield item

        return call

    @staticmethod
    async def _pipe(upstream: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            async for item in upstream:
                yield item
        except grpc.aio.AioRpcError as err:
            await _relay(err, context)
        finally:
            upstream.cancel()  # the caller went away, or we are done: end the leader's side


class ReplicaBroker:
    """One replica: the public port, leader election, and the broker it runs while leading.

    Same daemon contract as :class:`~broker.server.Broker`; ``failed`` is set when the
    replica fenced itself off (it lost the lock or another writer changed its rows) and
    must be restarted.
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        internal_listen: str = "127.0.0.1:0",
        advertise_host: str = "",
        poll_s: float = 1.0,
        replica_id: str = "",
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not config.resolved_db_url().startswith("postgresql"):
            raise ValueError(
                "broker replicas need a PostgreSQL database (--db postgresql+psycopg://…)"
            )
        self.config = config
        self.internal_listen = internal_listen
        self.advertise_host = advertise_host or internal_listen.rsplit(":", 1)[0]
        if self.advertise_host in ("0.0.0.0", "[::]", ""):
            self.advertise_host = socket.gethostname()
        self.poll_s = poll_s
        self.replica_id = replica_id or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        )
        self.registry = registry if registry is not None else default_registry()
        self.port = 0
        self.broker: Broker | None = None
        self.leader_address = ""
        self.admin_key = ""
        self.failed = asyncio.Event()
        self._leader_gauge = Gauge(
            "rigshift_broker_replica_leader",
            "1 while this broker replica holds the scheduler lock and runs the core, else 0.",
            registry=self.registry,
        )
        self._channel: grpc.aio.Channel | None = None
        self._channel_address = ""
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._metrics_server: MetricsServer | None = None
        self._lock_conn: Connection | None = None
        self._engine = create_engine(config.resolved_db_url(), poolclass=NullPool)
        self._task: asyncio.Task[None] | None = None
        self._fencing: asyncio.Task[None] | None = None
        self._sd_cache: list[dict[str, Any]] = []
        self._sd_read_at = -SD_REFRESH_S
        self._stopping = False
        self._leader_secret = ""
        self._digest_metrics = DigestMetrics(self.registry)
        self.sessions = FollowerSessions(
            config.resolved_db_url(),
            replica_id=self.replica_id,
            lease_ttl_s=config.lease_ttl_s,
            heartbeat_interval_s=config.heartbeat_interval_s,
            registry=self.registry,
        )

    @property
    def address(self) -> str:
        """host:port of the public gRPC port."""
        return f"{self.config.listen.rsplit(':', 1)[0]}:{self.port}"

    @property
    def leading(self) -> bool:
        """True while this replica runs the core."""
        return self.broker is not None

    @property
    def metrics_address(self) -> str:
        """host:port of ``/metrics`` and ``/sd``; empty when off."""
        return self._metrics_server.address if self._metrics_server is not None else ""

    async def start(self) -> None:
        """Migrate/check the schema, bind the public port, then elect in the background."""
        cfg = self.config
        await asyncio.to_thread(lambda: Store(cfg.resolved_db_url()).close())  # schema check
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            *KEEPALIVE_OPTIONS,
        ]
        server = self._server = grpc.aio.server(options=options)
        self._health = HealthWithTime()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        server.add_generic_rpc_handlers((_Forwarder(self._leader_channel, self._local),))
        self.sessions.start()
        self.port = bind(server, cfg)
        await self._set_health(False)
        await server.start()
        if cfg.metrics_listen:
            self._metrics_server = MetricsServer(self.registry, self._sd_targets)
            await self._metrics_server.start(cfg.metrics_listen)
        await self._elect_once()
        self._task = asyncio.get_running_loop().create_task(self._elect_forever())
        log.info(
            "replica %s serving on %s (%s)",
            self.replica_id,
            self.address,
            "leader" if self.leading else f"follower of {self.leader_address or 'nobody yet'}",
        )

    def _sd_targets(self) -> list[dict[str, Any]]:
        broker = self.broker
        if broker is None or broker.metrics is None:
            return self._sd_cache  # a follower: what the database said at the last poll
        return broker.metrics.sd_targets()

    def _read_sd(self) -> list[dict[str, Any]]:
        """``/sd`` from the database: every online/draining agent's exporter, like the leader's."""
        query = text(
            "SELECT w.id, w.metrics_address, coalesce(f.display_name, w.farm_id), g.model "
            "FROM workers w LEFT JOIN farms f ON f.id = w.farm_id "
            "LEFT JOIN gpus g ON g.worker_id = w.id "
            "WHERE w.state != 'OFFLINE' AND w.metrics_address != '' ORDER BY w.id"
        )
        workers: dict[str, tuple[str, str, list[str]]] = {}
        with self._engine.connect() as conn:
            for worker_id, address, farm, model in conn.execute(query):
                workers.setdefault(worker_id, (address, farm, []))[2].extend(
                    [model] if model else []
                )
        return [
            {"targets": [address], "labels": {"farm": farm, "gpu_model": most_common_model(models)}}
            for address, farm, models in workers.values()
        ]

    def _leader_channel(self) -> grpc.aio.Channel | None:
        return self._channel if self.leader_address else None

    def _local(self, method: str) -> grpc.RpcMethodHandler | None:
        """A follower serves its agents' sessions itself; the leader forwards them to its core."""
        if method == SESSION_METHOD and not self.leading:
            return self.sessions.handler()
        return None

    async def _set_health(self, serving: bool) -> None:
        assert self._health is not None
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    # --- election ------------------------------------------------------------------

    async def _elect_forever(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.poll_s)
            try:
                await self._elect_once()
            except Exception:  # a database hiccup: log it, try again at the next poll
                log.exception("replica %s: election round failed", self.replica_id)

    async def _elect_once(self) -> None:
        if self.leading:
            if not await asyncio.to_thread(self._lock_alive):
                await self._fence("lost the connection that holds the scheduler lock")
            return
        if await asyncio.to_thread(self._try_lock):
            await self._lead()
            return
        address, secret = await asyncio.to_thread(self._read_leader)
        await self._follow(address, secret)
        if self._metrics_server is not None and time.monotonic() - self._sd_read_at > SD_REFRESH_S:
            self._sd_cache = await asyncio.to_thread(self._read_sd)
            self._sd_read_at = time.monotonic()

    def _try_lock(self) -> bool:
        if self._lock_conn is None:
            self._lock_conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            return bool(
                self._lock_conn.execute(
                    text("SELECT pg_try_advisory_lock(:k)"), {"k": LEADER_LOCK}
                ).scalar()
            )
        except Exception:
            with contextlib.suppress(Exception):
                self._lock_conn.close()
            self._lock_conn = None
            raise

    def _lock_alive(self) -> bool:
        conn = self._lock_conn
        if conn is None:
            return False
        try:
            held = conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND pid = pg_backend_pid() AND objid = :k"
                ),
                {"k": LEADER_LOCK & 0xFFFFFFFF},
            ).scalar()
        except Exception:
            return False
        return bool(held)

    def _read_leader(self) -> tuple[str, str]:
        with self._engine.connect() as conn:
            row = conn.execute(
                text("SELECT address, secret FROM broker_leader WHERE id = 1")
            ).first()
        return (str(row[0]), str(row[1])) if row else ("", "")

    def _record_leader(self, address: str, secret: str) -> int:
        assert self._lock_conn is not None
        # One statement, so a follower never reads a missing or half-written row.
        epoch = self._lock_conn.execute(
            text(
                "INSERT INTO broker_leader (id, replica, address, epoch, since, secret) "
                "VALUES (1, :r, :a, 1, :t, :s) ON CONFLICT (id) DO UPDATE SET "
                "replica = :r, address = :a, epoch = broker_leader.epoch + 1, since = :t, "
                "secret = :s RETURNING epoch"
            ),
            {"r": self.replica_id, "a": address, "t": time.time(), "s": secret},
        ).scalar()
        return int(epoch or 0)

    async def _follow(self, address: str, secret: str) -> None:
        if address == self.leader_address and secret == self._leader_secret:
            return
        self._leader_secret = secret
        await self._point_at(address)
        await self._set_health(bool(address))
        if address:
            log.info("replica %s follows the leader at %s", self.replica_id, address)

    async def _point_at(self, address: str) -> None:
        old = self._channel
        self.leader_address = address
        self._channel = (
            grpc.aio.insecure_channel(
                address,
                options=[
                    ("grpc.max_receive_message_length", self.config.max_message_bytes),
                    ("grpc.max_send_message_length", self.config.max_message_bytes),
                ],
            )
            if address
            else None
        )
        # The held sessions follow the leader (their upstream streams re-open, a full
        # digest goes out); a replica that leads holds none.
        self.sessions.set_leader(
            Leader(self._channel, self._leader_secret, address)
            if self._channel is not None and not self.leading
            else None
        )
        if old is not None:
            await old.close(grace=None)

    async def _lead(self) -> None:
        cfg = replace(
            self.config,
            listen=self.internal_listen,
            tls_cert="",
            tls_key="",
            tls_client_ca="",
            metrics_listen="",
            write_credentials=False,
        )
        secret = secrets.token_urlsafe(32)  # this epoch's replica secret (ReplicaService)

        def add_services(svc: BrokerService, server: grpc.aio.Server) -> None:
            servicer = ReplicaServicer(svc, secret, cfg.lease_ttl_s, self._digest_metrics)
            replica_service_pb2_grpc.add_ReplicaServiceServicer_to_server(servicer, server)

        broker = Broker(
            cfg, registry=self.registry, add_services=add_services, metric_snapshot=False
        )
        try:
            await broker.start()
        except BaseException:
            await broker.stop()
            raise
        assert broker.service is not None
        loop = asyncio.get_running_loop()

        def on_stale() -> None:
            self._fencing = loop.create_task(
                self._fence("another broker changed a GPU row this one wrote")
            )

        broker.service.on_stale = on_stale
        self.broker = broker
        # Sessions held as a follower end (UNAVAILABLE): their agents reconnect and get a
        # session on this replica's core, or on another follower (docs/replicas.md).
        self.sessions.end_all("this broker replica leads now; reconnect")
        address = f"{self.advertise_host}:{broker.port}"
        epoch = await asyncio.to_thread(self._record_leader, address, secret)
        self._leader_gauge.set(1)
        await self._point_at(address)
        await self._set_health(True)
        if broker.admin_key:
            self.admin_key = broker.admin_key
            if self.config.write_credentials:
                from rigshift.credentials import save_api_key

                save_api_key(self.address, broker.admin_key)
        log.info(
            "replica %s leads (epoch %d): core on %s, %d jobs, %d workers loaded",
            self.replica_id,
            epoch,
            address,
            len(broker.service.core.jobs),
            len(broker.service.core.workers),
        )

    async def _fence(self, why: str) -> None:
        """Stop running the core at once; this replica must be restarted to serve again."""
        if self.failed.is_set():
            return
        log.error("replica %s stops leading: %s", self.replica_id, why)
        self.failed.set()
        self._leader_gauge.set(0)
        broker, self.broker = self.broker, None
        await self._point_at("")
        await self._set_health(False)
        if broker is not None:
            await broker.stop()

    # --- lifecycle ----------------------------------------------------------------

    async def stop(self) -> None:
        """Stop serving; a leader gives up its lock so a follower takes over at once."""
        if self._stopping:
            return
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await self.sessions.stop()
        if self._server is not None:
            await self._server.stop(self.config.grace_s)
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None
        await self._point_at("")
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        if self._lock_conn is not None:
            with contextlib.suppress(Exception):
                self._lock_conn.close()  # ends the session: the lock goes with it
        self._engine.dispose()

    async def __aenter__(self) -> ReplicaBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
