"""A follower replica's own agent sessions (issue 17; docs/replicas.md, "Sessions").

A follower terminates ``WorkerService/Session`` itself instead of forwarding it:

- It authenticates the worker credential against PostgreSQL (``worker_credentials``, a
  small in-process cache: :class:`CredentialCache`) and answers every renewal on the
  session stream from memory with ``lease_renewed`` (now + the leader's lease TTL).
- It keeps the workers renewed since the last digest and, once per heartbeat interval,
  renews them all on the leader with ONE ``ReplicaService/RenewLeases`` call (statuses
  only where the agent sent one). The leader's answer says which workers it does not
  know (their sessions end with NOT_FOUND: the agent registers again) and whose status
  it wants (the next renewal answer asks the agent for it).
- Instructions come from one upstream ``StreamInstructions`` per agent to the leader,
  opened with the agent's own credential and relayed into its session (the leader's
  ``Reconcile`` first). Reports and registrations are forwarded as before.
- When the leader changes, sessions stay open: the upstream streams re-open on the new
  leader (whose Reconcile reaches the agent — it is level-triggered) and a digest of
  every held worker goes out at once, so the agents keep their leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import bindparam, create_engine, text

from broker import validation as v
from broker.api.boundary import abort_with
from broker.auth import bearer
from broker.convert import timestamp
from broker.errors import BrokerError, DatabaseUnavailable, PermissionDenied, Unauthenticated
from rigshift.v1 import replica_service_pb2, worker_service_pb2

__all__ = [
    "SESSION_METHOD",
    "CredentialCache",
    "FollowerSessions",
    "Leader",
]

log = logging.getLogger("rigshift.broker.replica")

SESSION_METHOD = "/rigshift.v1.WorkerService/Session"
STREAM_METHOD = "/rigshift.v1.WorkerService/StreamInstructions"
RENEW_METHOD = "/rigshift.v1.ReplicaService/RenewLeases"
CREDENTIAL_CACHE_S = 30.0
"""A follower trusts a credential it checked for this long (a replaced credential may
work on a follower for at most this long after RegisterWorker issued a new one)."""
UNKNOWN_CACHE_S = 2.0
"""A credential the database did not know is refused without asking again for this long."""
#: Upstream statuses that end the agent's session: retrying cannot help.
_PERMANENT = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
_HOP_HEADERS = frozenset({"user-agent", "content-type", "te", "host"})


@dataclass(frozen=True)
class Leader:
    """Where the leader is: a channel to its internal port and its epoch's replica secret."""

    channel: grpc.aio.Channel
    secret: str
    address: str


@dataclass(frozen=True)
class _End:
    """Ends a session: OK, or an error status with its trailers."""

    code: grpc.StatusCode
    details: str = ""
    trailers: tuple[tuple[str, Any], ...] = ()


@dataclass(eq=False)
class _Session:
    """One agent's session held by this follower."""

    worker_id: str
    metadata: tuple[tuple[str, Any], ...]
    out: asyncio.Queue[worker_service_pb2.Instruction | _End] = field(default_factory=asyncio.Queue)
    status_wanted: bool = False
    reconciled: bool = False  # the leader's first Reconcile reached the agent
    held: list[worker_service_pb2.Instruction] = field(default_factory=list)

    def answer(self, renewal: worker_service_pb2.Instruction) -> None:
        """Send a renewal's answer; until the first Reconcile it waits, so that the agent
        sees the Reconcile first, as from a single broker."""
        if self.reconciled:
            self.out.put_nowait(renewal)
        else:
            self.held.append(renewal)

    def relay(self, instruction: worker_service_pb2.Instruction) -> None:
        """Pass on an instruction of the leader (and the answers held for the Reconcile)."""
        self.out.put_nowait(instruction)
        if not self.reconciled and instruction.WhichOneof("kind") == "reconcile":
            self.reconciled = True
            for renewal in self.held:
                self.out.put_nowait(renewal)
            self.held.clear()

    def end(self, code: grpc.StatusCode, details: str = "", trailers: Any = ()) -> None:
        self.out.put_nowait(_End(code, details, tuple(trailers or ())))


class CredentialCache:
    """worker credential → worker id, read from PostgreSQL and kept for a while.

    Lookups that miss the cache at the same time (a whole fleet reconnecting after a
    failover) are answered by one query per batch of up to ``BATCH`` credentials.
    """

    BATCH = 1000

    def __init__(self, db_url: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = create_engine(db_url, pool_size=1, max_overflow=0, pool_pre_ping=True)
        self._clock = clock
        self._known: dict[str, tuple[str, float]] = {}  # sha256 -> (worker id or "", until)
        self._pending: dict[str, asyncio.Future[str]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def worker_of(self, secret: str) -> str:
        """The worker whose credential ``secret`` is, else Unauthenticated."""
        digest = hashlib.sha256(secret.encode()).hexdigest()
        hit = self._known.get(digest)
        if hit is not None and hit[1] > self._clock():
            worker_id = hit[0]
        else:
            future = self._pending.get(digest)
            if future is None:
                future = self._pending[digest] = asyncio.get_running_loop().create_future()
            if self._reader is None or self._reader.done():
                self._reader = asyncio.get_running_loop().create_task(self._read_pending())
            worker_id = await asyncio.shield(future)
        if not worker_id:
            raise Unauthenticated("credential not recognised (revoked, or for another broker?)")
        return worker_id

    async def _read_pending(self) -> None:
        while self._pending:
            batch = list(self._pending)[: self.BATCH]
            try:
                found = await asyncio.to_thread(self._read, batch)
                error: BaseException | None = None
            except Exception as err:  # the database is away: these sessions are refused
                log.warning("credential lookup failed: %s", err)
                found, error = {}, DatabaseUnavailable("cannot check the worker credential now")
            if len(self._known) > 200_000:
                self._known.clear()  # bound the memory a credential-guessing caller can use
            now = self._clock()
            for digest in batch:
                future = self._pending.pop(digest)
                if error is not None:
                    future.set_exception(error)
                    continue
                worker_id = found.get(digest, "")
                ttl = CREDENTIAL_CACHE_S if worker_id else UNKNOWN_CACHE_S
                self._known[digest] = (worker_id, now + ttl)
                future.set_result(worker_id)

    def _read(self, digests: list[str]) -> dict[str, str]:
        query = text(
            "SELECT c.credential_sha256, c.worker_id FROM worker_credentials c "
            "JOIN workers w ON w.id = c.worker_id WHERE c.credential_sha256 IN :ds"
        ).bindparams(bindparam("ds", expanding=True))
        with self._engine.connect() as conn:
            return {str(d): str(w) for d, w in conn.execute(query, {"ds": digests})}

    def close(self) -> None:
        """Close the database connections."""
        self._engine.dispose()


def _forwardable(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (k, val)
        for k, val in (context.invocation_metadata() or ())
        if not k.startswith((":", "grpc-")) and k not in _HOP_HEADERS
    )


class FollowerSessions:
    """The agent sessions a follower holds, their digests and their upstream streams."""

    def __init__(
        self,
        db_url: str,
        *,
        replica_id: str,
        lease_ttl_s: float,
        heartbeat_interval_s: float,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.replica_id = replica_id
        self.lease_ttl_s = lease_ttl_s
        self.interval_s = heartbeat_interval_s
        self.credentials = CredentialCache(db_url)
        self._clock = clock
        self._leader: Leader | None = None
        self._changed = asyncio.Event()  # replaced (after being set) at every leader change
        self._sessions: dict[str, _Session] = {}
        self._renewed: dict[str, worker_service_pb2.WorkerStatus | None] = {}
        self._full = False  # the next digest names every held worker (a new leader)
        self._digest_now = asyncio.Event()
        self._last_ok = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self.digests_sent = 0
        self._renewals = self._digests = None
        if registry is not None:
            Gauge(
                "rigshift_broker_replica_sessions",
                "Agent sessions this replica holds as a follower.",
                registry=registry,
            ).set_function(lambda: len(self._sessions))
            self._renewals = Counter(
                "rigshift_broker_replica_session_renewals",
                "Lease renewals this follower answered itself.",
                registry=registry,
            )
            self._digests = Counter(
                "rigshift_broker_replica_digests_sent",
                "RenewLeases digests this follower sent to the leader.",
                registry=registry,
            )

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the digest loop (on the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._digest_loop())

    async def stop(self) -> None:
        """End every session (UNAVAILABLE: the agents reconnect elsewhere) and the loop."""
        self.end_all("this broker replica is shutting down; reconnect")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self.credentials.close)

    @property
    def held(self) -> int:
        """Sessions held now."""
        return len(self._sessions)

    def end_all(self, why: str) -> None:
        """End every held session with UNAVAILABLE (this replica leads now, or stops)."""
        for session in list(self._sessions.values()):
            session.end(grpc.StatusCode.UNAVAILABLE, why)

    def set_leader(self, leader: Leader | None) -> None:
        """The leader changed (None: none known, or this replica leads): upstream streams
        re-open on the new one and a digest of every held worker goes out at once."""
        self._leader = leader
        old, self._changed = self._changed, asyncio.Event()
        old.set()
        if leader is not None:
            self._full = True
            self._digest_now.set()

    # --- the Session RPC ------------------------------------------------------------

    def handler(self) -> grpc.RpcMethodHandler:
        """The method handler of ``WorkerService/Session`` on this follower."""
        return grpc.stream_stream_rpc_method_handler(
            self._serve,
            request_deserializer=worker_service_pb2.SessionRequest.FromString,
            response_serializer=worker_service_pb2.Instruction.SerializeToString,
        )

    async def _admit(
        self,
        requests: AsyncIterator[worker_service_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> tuple[str, worker_service_pb2.SessionRequest] | None:
        """The worker and its first renewal, if the credential is this worker's."""
        metadata = tuple((k, str(val)) for k, val in context.invocation_metadata() or ())
        secret = bearer(metadata)
        if not secret:
            raise Unauthenticated("WorkerService/Session needs `authorization: Bearer <key>`")
        worker_id = await self.credentials.worker_of(secret)
        first = await anext(aiter(requests), None)
        if first is None:
            return None  # the agent closed before its first renewal
        named = v.parse_name(first.worker, "workers", "worker")
        if named != worker_id:
            raise PermissionDenied(
                f"this credential does not belong to workers/{named}",
                reason="WRONG_WORKER_CREDENTIAL",
            )
        return worker_id, first

    async def _serve(
        self,
        requests: AsyncIterator[worker_service_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[worker_service_pb2.Instruction]:
        try:
            admitted = await self._admit(requests, context)
        except BrokerError as err:
            await abort_with(context, err)
        except grpc.aio.AbortError:
            raise
        except Exception:  # a bug or a surprise: the agent retries (UNAVAILABLE), we log it
            log.exception("replica %s: a session could not be admitted", self.replica_id)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the replica could not admit this session"
            )
        if admitted is None:
            return
        worker_id, first = admitted
        session = _Session(worker_id, _forwardable(context))
        old = self._sessions.get(worker_id)
        if old is not None:
            old.end(grpc.StatusCode.OK)  # a newer session of the same agent: the old one ends
        self._sessions[worker_id] = session
        session.answer(self._renew(session, first))
        loop = asyncio.get_running_loop()
        tasks = (
            loop.create_task(self._read(session, requests)),
            loop.create_task(self._upstream(session)),
        )
        try:
            while True:
                item = await session.out.get()
                if isinstance(item, _End):
                    if item.code != grpc.StatusCode.OK:
                        await context.abort(item.code, item.details, item.trailers)
                    return
                yield item
        finally:
            for task in tasks:
                task.cancel()
            if self._sessions.get(worker_id) is session:
                del self._sessions[worker_id]

    def _renew(
        self, session: _Session, request: worker_service_pb2.SessionRequest
    ) -> worker_service_pb2.Instruction:
        """Take one renewal: note it for the next digest and answer it from memory."""
        if request.HasField("status"):
            self._renewed[session.worker_id] = request.status
            session.status_wanted = False
        else:
            self._renewed.setdefault(session.worker_id, None)
        if self._renewals is not None:
            self._renewals.inc()
        renewed = worker_service_pb2.LeaseRenewed(
            lease_expire_time=timestamp(self._clock() + self.lease_ttl_s),
            status_wanted=session.status_wanted,
        )
        return worker_service_pb2.Instruction(lease_renewed=renewed)

    async def _read(
        self, session: _Session, requests: AsyncIterator[worker_service_pb2.SessionRequest]
    ) -> None:
        """Answer every later renewal; the agent closing its side ends the session."""
        name = f"workers/{session.worker_id}"
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            async for request in requests:
                if request.worker and request.worker != name:
                    session.end(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"this session is {name}'s; a renewal named {request.worker}",
                    )
                    return
                session.answer(self._renew(session, request))
        session.end(grpc.StatusCode.OK)

    async def _upstream(self, session: _Session) -> None:
        """Relay the leader's instructions for this worker; re-open on a new leader."""
        delay = 0.1
        name = f"workers/{session.worker_id}"
        request = worker_service_pb2.StreamInstructionsRequest(worker=name)
        while True:
            changed, leader = self._changed, self._leader
            if leader is None:
                await changed.wait()
                continue
            call = leader.channel.unary_stream(
                STREAM_METHOD,
                request_serializer=worker_service_pb2.StreamInstructionsRequest.SerializeToString,
                response_deserializer=worker_service_pb2.Instruction.FromString,
            )(request, metadata=session.metadata)
            try:
                async for instruction in call:
                    delay = 0.1
                    session.relay(instruction)
                # The leader ended the stream: a newer one of this worker superseded it, or
                # the leader is stopping. As on a single broker, the agent reconnects.
                session.end(
                    grpc.StatusCode.UNAVAILABLE, "the broker ended this worker's instructions"
                )
                return
            except grpc.aio.AioRpcError as err:
                if err.code() in _PERMANENT:
                    session.end(err.code(), err.details() or "", err.trailing_metadata())
                    return
                log.debug("upstream of %s: %s; retrying", session.worker_id, err.code())
            finally:
                call.cancel()
            # A new leader: at once; the same one (loading, briefly away): after a backoff.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), delay)
            delay = min(2.0, delay * 2)

    # --- digests ---------------------------------------------------------------------

    async def _digest_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._digest_now.wait(), self.interval_s)
            self._digest_now.clear()
            try:
                await self.send_digest()
            except Exception:  # never let one bad round end the loop
                log.exception("replica %s: lease digest failed", self.replica_id)
            if self._sessions and time.monotonic() - self._last_ok > self.lease_ttl_s:
                # No leader took a digest for a whole TTL: the leases these sessions
                # report are not real any more. The agents go and find a broker that leads.
                self.end_all("no broker leader took this replica's lease renewals; reconnect")
                self._last_ok = time.monotonic()

    async def send_digest(self) -> bool:
        """Send the renewals since the last digest (every held worker after a leader
        change) to the leader in one call; True when the leader took them."""
        if not self._sessions and not self._renewed:
            self._last_ok = time.monotonic()
            return True
        leader, full = self._leader, self._full
        renewed, self._renewed = self._renewed, {}
        if full:
            for worker_id in self._sessions:
                renewed.setdefault(worker_id, None)
            self._full = False
        if leader is None or not renewed:
            self._merge_back(renewed, full)
            return False
        request = replica_service_pb2.RenewLeasesRequest(replica=self.replica_id)
        for worker_id, status in renewed.items():
            request.renewals.add(worker_id=worker_id, status=status)
        try:
            response = await leader.channel.unary_unary(
                RENEW_METHOD,
                request_serializer=replica_service_pb2.RenewLeasesRequest.SerializeToString,
                response_deserializer=replica_service_pb2.RenewLeasesResponse.FromString,
            )(
                request,
                metadata=(("authorization", f"Bearer {leader.secret}"),),
                timeout=max(1.0, self.interval_s),
            )
        except grpc.aio.AioRpcError as err:
            log.warning(
                "replica %s: digest of %d renewals to %s failed: %s",
                self.replica_id,
                len(renewed),
                leader.address,
                err.code(),
            )
            self._merge_back(renewed, full)
            return False
        self._last_ok = time.monotonic()
        self.digests_sent += 1
        if self._digests is not None:
            self._digests.inc()
        if response.lease_ttl_seconds > 0:
            self.lease_ttl_s = float(response.lease_ttl_seconds)
        for lease in response.leases:
            session = self._sessions.get(lease.worker_id)
            if session is None:
                continue
            if lease.unknown:
                session.end(
                    grpc.StatusCode.NOT_FOUND,
                    f"workers/{lease.worker_id} not found (register again)",
                )
            elif lease.status_wanted:
                session.status_wanted = True
        return True

    def _merge_back(
        self, renewed: dict[str, worker_service_pb2.WorkerStatus | None], full: bool
    ) -> None:
        """Keep renewals a failed digest did not deliver (newer statuses win)."""
        for worker_id, status in renewed.items():
            if self._renewed.get(worker_id) is None:
                self._renewed[worker_id] = status
        self._full = self._full or full
