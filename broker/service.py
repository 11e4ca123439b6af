"""The shell around the pure core: one lock, persistence, pushes and notifications.

Every state change goes through :meth:`BrokerService.apply`: events are handled
by the core under a lock; what their commands ask to write (``Persist``,
``PostLedger``, ``AppendLog``, folded into one ``Writes``) is saved in one
transaction, and only then are the other commands carried out (assignments and
cancellations pushed to agents, watchers woken, a scheduling pass asked for by
``RequestSchedule``) — so nothing an agent or client sees is lost by a crash. The
shell reads the core only through its public reads.

**When the database fails a write** the core is already ahead of the store. The
service then keeps that batch's ``Writes`` (job and worker ids, ledger entries, log
lines) and its commands, *held*, and enters an outage: every later change is refused
with ``DatabaseUnavailable`` before the core sees it, except heartbeats (leases live
in memory, so a database outage does not expire the fleet's leases; lease expiry and
scheduling pause meanwhile). A probe every ``db_retry_interval_s`` waits for the
database; once it takes writes, the held changes are written in one transaction and
only then are the held commands carried out and changes accepted again — no
restart, and nothing an agent or client was told rests on an uncommitted change. The
caller whose write failed got UNAVAILABLE: its change is written on recovery, and its
retry (same ``request_id`` or report sequence number) finds it applied once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from broker.artifacts import DEFAULT_MAX_OUTPUT_BYTES
from broker.auth import Principal, RateLimiter, Role, bearer, new_api_key
from broker.clock import BrokerClock
from broker.commit import (
    Pending,
    answer_with,
    failed_write,
    in_memory_only,
    settle,
)
from broker.convert import assignment_pb
from broker.core import BrokerCore
from broker.errors import (
    DatabaseUnavailable,
    NotFound,
    StaleWriter,
    Unauthenticated,
    Unavailable,
)
from broker.events import (
    AppendLog,
    Assign,
    Cancel,
    Command,
    Event,
    Heartbeat,
    JobsStored,
    RequestSchedule,
    SchedulePass,
    SendCurtail,
    SendReinstate,
    Tick,
    Transition,
    Writes,
)
from broker.metrics import BrokerMetrics, FarmNames
from broker.model import TERMINAL_JOB_STATES
from broker.outage import DatabaseOutages, Outage
from broker.records import Job
from rigshift.v1 import worker_service_pb2

if TYPE_CHECKING:
    from broker.store import Store

__all__ = ["GC_YOUNG_THRESHOLD", "BrokerService", "sha256_hex", "tune_gc"]

log = logging.getLogger("rigshift.broker")

SCHEDULE_REST = 3.0
"""After a scheduling pass of d seconds the loop rests SCHEDULE_REST * d before the next."""
SCHEDULE_REST_MAX_S = 0.5
"""The rest never exceeds this, however long a pass took."""
GC_YOUNG_THRESHOLD = 50_000
"""Allocations between young-generation collections in a broker process (CPython: 700)."""
DB_PROBE_INTERVAL_S = 5.0
"""While the database serves: how often it is probed, so an idle broker notices an outage."""
DB_RETRY_INTERVAL_S = 1.0
"""During an outage: how often the database is probed; writes resume within about this."""


def tune_gc() -> None:
    """Collect the young generation every GC_YOUNG_THRESHOLD allocations, not every 700.

    With thousands of RPCs a second, each young collection promotes the objects of the RPCs
    in flight; the old generation then fills up within seconds, and every full collection
    walks the whole heap (100-400 ms at 2,000-3,000 agents), stalling every RPC. Collecting
    the young generation less often promotes far less, so full collections become rare.
    Process-wide and idempotent; never lowers a threshold set higher.
    """
    gen0, gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < GC_YOUNG_THRESHOLD:  # 0: automatic collection is off; leave it off
        gc.set_threshold(GC_YOUNG_THRESHOLD, gen1, gen2)


def sha256_hex(secret: str) -> str:
    """Hex sha256 of a secret; secrets are stored only this way."""
    return hashlib.sha256(secret.encode()).hexdigest()


class BrokerService(DatabaseOutages):
    """State, persistence and fan-out shared by all servicers of one broker process."""

    def __init__(
        self,
        core: BrokerCore,
        store: Store,
        *,
        clock: Callable[[], float] | None = None,
        metrics: BrokerMetrics | None = None,
        farm_names: Callable[[str], str] | None = None,
    ) -> None:
        self.core = core
        self.store = store
        #: Unix seconds for every event; immune to steps of the wall clock (broker.clock).
        self.clock: Callable[[], float] = clock if clock is not None else BrokerClock()
        self.metrics = metrics
        #: Farm id -> display name, cached (the broker shares one with its metrics).
        self.farm_names: Callable[[str], str] = farm_names or FarmNames(
            lambda farm_id: store.get_farm(farm_id).display_name
        )
        self._lock = asyncio.Lock()
        self._queue: list[Pending] = []
        """Calls waiting for the next flush (group commit), in arrival order."""
        self.stale = False
        self.on_stale: Callable[[], None] | None = None
        """Called once the store refused a write because another broker changed the row."""
        self._schedule_wanted = asyncio.Event()
        self._pass_waiters: list[asyncio.Future[None]] = []
        self._subscribers: dict[str, set[asyncio.Event]] = {}
        self._streams: dict[str, asyncio.Queue[worker_service_pb2.Instruction | None]] = {}
        self._credentials: dict[str, str] = store.worker_credentials()
        self._worker_by_digest = {d: w for w, d in self._credentials.items()}
        self._api_keys: dict[str, Principal] = {}
        # Registry credentials per job (CreateJob's registry_auth): in this process's memory
        # only, never in the core, the store, a log or a response; dropped when the job ends.
        self._registry_auth: dict[str, bytes] = {}
        self.reload_api_keys()
        self.rate_limiter = RateLimiter()
        self._tasks: list[asyncio.Task[None]] = []
        self.max_output_bytes = DEFAULT_MAX_OUTPUT_BYTES
        """Largest output archive kept per attempt; sent to agents with each assignment."""
        self.db_probe_interval_s = DB_PROBE_INTERVAL_S
        self.db_retry_interval_s = DB_RETRY_INTERVAL_S
        self._outage: Outage | None = None

    # --- state changes -----------------------------------------------------------

    async def apply(self, *events: Event) -> list[Command]:
        """Handle events in order, persist, then carry out the commands; returns them.

        Group commit: the call is queued, and every call queued within one turn of the
        event loop is handled by the core in arrival order and saved in one transaction
        (:meth:`_flush`); the answer comes once that transaction committed. During a
        database outage only heartbeats are handled (in memory); anything else is refused
        with DatabaseUnavailable before the core sees it.
        """
        self._admit(events)
        future: asyncio.Future[list[Command]] = asyncio.get_running_loop().create_future()
        self._enqueue(Pending(events, (), settle(future)))
        return await future

    def renew(
        self,
        worker_id: str,
        environments: tuple[str, ...] | None,
        answer: Callable[[BaseException | None], None],
    ) -> None:
        """A lease renewal (``Heartbeat``) without a coroutine per call: ``answer(None)``
        once it took effect (and whatever it had to write committed), else ``answer(err)``.

        The session stream sends thousands of these a second, so they skip ``apply``'s
        future. When nothing is queued the core handles the renewal at once, which is
        the order ``apply`` would give it (the flush is one synchronous step, so no
        transaction is in progress now); a renewal that changes nothing to store (the
        worker was online, its status unchanged: almost all) is answered at once, with
        no write. Otherwise it waits its turn in the queue, as ``apply`` would.
        """
        event = Heartbeat(self.clock(), worker_id, environments)
        try:
            self._admit((event,))
        except BaseException as err:
            answer(err)
            return
        done = answer_with(answer)
        if self._queue:
            self._enqueue(Pending((event,), (), done))
            return
        try:
            cmds = self._handle(event)
        except Exception as err:
            answer(err)
            return
        if not cmds:
            answer(None)
            return
        # e.g. it came back ONLINE: persisted before the answer, like any change
        self._enqueue(Pending((), tuple(cmds), done, in_memory=True))

    def _admit(self, events: tuple[Event, ...]) -> None:
        if self.stale:
            raise StaleWriter("this broker no longer leads; retry (another replica serves)")
        if self._outage is not None and not in_memory_only(events):
            raise self._refusal()

    def all_stored(self) -> bool:
        """True when everything the core did is stored: no outage, no write waiting, and
        this broker still leads."""
        return self._outage is None and not self._queue and not self.stale

    def _handle(self, event: Event) -> list[Command]:
        started = time.perf_counter()
        cmds = self.core.handle(event)
        if self.metrics is not None:
            self.metrics.observe(event, cmds, time.perf_counter() - started)
        return cmds

    def _enqueue(self, pending: Pending) -> None:
        self._queue.append(pending)
        if len(self._queue) == 1:
            # Runs after every callback ready now: the calls made in this turn of the loop
            # (many RPC handlers resume in one turn) share the transaction.
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Handle the queued calls in arrival order, save what they changed in one
        transaction, then answer each and carry out the commands (group commit).

        One synchronous step of the event loop: the store write is synchronous, so no
        event can reach the core while a transaction is being written, and calls made
        meanwhile are queued for the next flush. A call whose events the core refused
        gets its error, but what its earlier events changed is still saved.
        """
        batch, self._queue = self._queue, []
        cmds: list[Command] = []
        for p in batch:
            if self.stale:
                p.error = StaleWriter("this broker no longer leads; retry (another replica serves)")
                continue
            if self._outage is not None and not p.in_memory:
                p.error = self._refusal()  # an outage began in an earlier flush
                continue
            p.cmds = list(p.handled)
            for ev in p.events:
                try:
                    p.cmds += self._handle(ev)
                except Exception as err:
                    p.error = err
                    break
            cmds += p.cmds
        try:
            committed = self._persist(cmds)
        except Exception as err:
            committed = False
            for p in batch:
                if p.error is None and not (p.in_memory and isinstance(err, DatabaseUnavailable)):
                    p.error = failed_write(err)  # heartbeats: held, answered from memory
        for p in batch:
            try:
                p.done(p.error if p.error is not None else p.cmds if committed else [])
            except Exception:  # one caller's bug must not leave the others unanswered
                log.exception("answering a call of a committed batch failed")
        if committed:
            self._execute(cmds)

    def _persist(self, cmds: list[Command]) -> bool:
        """Save what the core changed in one transaction; False when it was held instead
        (during an outage: heartbeats only reach this). A failed write holds the changes,
        starts an outage and raises; so does a write refused by a newer leader."""
        writes = Writes.of(cmds)
        if self._outage is not None:
            self._hold(writes, cmds)
            return False
        if writes:
            try:
                self.store.save(self.core, writes)
            except StaleWriter:
                # Another replica leads now; this core's memory is no longer true.
                self.stale = True
                if self.on_stale is not None:
                    self.on_stale()
                raise
            except DatabaseUnavailable as err:
                self._begin_outage(err)
                self._hold(writes, cmds)
                raise
            except Exception as err:  # a bug: still, the core is ahead of the store
                log.exception("writing a batch failed")
                self._begin_outage(
                    DatabaseUnavailable(f"the last write failed ({type(err).__name__}: {err})")
                )
                self._hold(writes, cmds)
                raise
        self._committed(writes, cmds)
        return True

    def _committed(self, writes: Writes, cmds: list[Command]) -> None:
        """After a transaction committed (or when a batch had nothing to write): wake the
        watchers of its jobs and ask for a scheduling pass if a command wants one. The one
        place for whatever must follow a commit: the core forgets the finished jobs the
        store now has (``stored``) before anyone is woken to read them."""
        self.stored(writes.job_ids)
        self._notify(writes.job_ids)
        if any(type(c) is RequestSchedule for c in cmds):
            self._schedule_wanted.set()

    def stored(self, job_ids: frozenset[str]) -> None:
        """Tell the core that these jobs are committed to the store (``JobsStored``): it
        forgets the finished ones. Call under the lock, right after the commit."""
        if job_ids:
            self.core.handle(JobsStored(self.clock(), job_ids))

    def read_job(self, job_id: str) -> Job:
        """The job as the core holds it, else as the store holds it (a finished job the
        core has let go of); NotFound when neither has it."""
        job = self.core.jobs.get(job_id)
        if job is None:
            job = self.store.load_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found", metadata={"job": job_id})
        return job

    def _execute(self, cmds: list[Command]) -> None:
        for cmd in cmds:
            match cmd:
                case Assign():
                    assignment = self.assignment(cmd)
                    self._push(cmd.worker_id, worker_service_pb2.Instruction(assignment=assignment))
                case Cancel():
                    self._push(cmd.worker_id, cancellation(cmd))
                case SendReinstate():
                    reinstate = worker_service_pb2.Reinstate(
                        gpu_index=cmd.gpu_index, requested_by=cmd.requested_by
                    )
                    self._push(cmd.worker_id, worker_service_pb2.Instruction(reinstate=reinstate))
                case SendCurtail():
                    curtail = curtail_pb(cmd.active, cmd.end_time, cmd.reason)
                    self._push(cmd.worker_id, worker_service_pb2.Instruction(curtail=curtail))
                case AppendLog():
                    self._notify({cmd.job_id})
                case Transition() if cmd.to_state in TERMINAL_JOB_STATES:
                    self._registry_auth.pop(cmd.job_id, None)

    def assignment(self, assign: Assign) -> worker_service_pb2.Assignment:
        """The agent's Assignment for ``assign``, with the shell's limits and the job's
        registry credentials (held in memory only) added."""
        assignment = assignment_pb(assign, self.max_output_bytes)
        auth = self._registry_auth.get(assign.job_id)
        if auth:
            assignment.spec.registry_auth = auth
        return assignment

    # --- registry credentials (memory only) -------------------------------------------

    def hold_registry_auth(self, job_id: str, auth: bytes) -> None:
        """Keep a job's registry credentials in memory, for its assignments."""
        if auth:
            self._registry_auth[job_id] = auth

    def drop_registry_auth(self, job_id: str) -> None:
        """Forget a job's registry credentials (no-op if it has none)."""
        self._registry_auth.pop(job_id, None)

    def _push(self, worker_id: str, instruction: worker_service_pb2.Instruction) -> None:
        # No open stream: the next StreamInstructions starts with a full Reconcile.
        queue = self._streams.get(worker_id)
        if queue is not None:
            queue.put_nowait(instruction)

    # --- watchers ----------------------------------------------------------------

    def _notify(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            for ev in self._subscribers.get(job_id, ()):
                ev.set()

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Event]:
        """An asyncio.Event set whenever the job changes or gets output."""
        ev = asyncio.Event()
        self._subscribers.setdefault(job_id, set()).add(ev)
        try:
            yield ev
        finally:
            subs = self._subscribers.get(job_id)
            if subs is not None:
                subs.discard(ev)
                if not subs:
                    del self._subscribers[job_id]

    # --- agent sessions ----------------------------------------------------------

    def open_stream(self, worker_id: str) -> asyncio.Queue[worker_service_pb2.Instruction | None]:
        """Attach the instruction stream of a worker; an older stream is told to end."""
        if self._holds_changes_for(worker_id):
            # Its Reconcile would list attempts the store does not have (or omit cancelled
            # ones): the agent reconnects once they are written.
            raise self._refusal()
        old = self._streams.get(worker_id)
        if old is not None:
            old.put_nowait(None)
        queue: asyncio.Queue[worker_service_pb2.Instruction | None] = asyncio.Queue()
        self._streams[worker_id] = queue
        reconcile = worker_service_pb2.Reconcile(
            assignments=[self.assignment(a) for a in self.core.assignments(worker_id)]
        )
        worker = self.core.workers.get(worker_id)
        on = self.core.active_curtailment(worker.farm_id, self.clock()) if worker else None
        if on is not None:
            reconcile.curtail.CopyFrom(curtail_pb(True, on.end_time, on.reason))
        queue.put_nowait(worker_service_pb2.Instruction(reconcile=reconcile))
        return queue

    def connected(self, worker_id: str) -> bool:
        """True while the worker's agent holds an instruction stream (pushes reach it)."""
        return worker_id in self._streams

    def close_stream(self, worker_id: str, queue: asyncio.Queue) -> None:
        """Detach a stream if it is still the current one."""
        if self._streams.get(worker_id) is queue:
            del self._streams[worker_id]

    def new_credential(self, worker_id: str) -> str:
        """Issue a fresh worker credential; only its hash is kept."""
        self.ensure_writable()
        credential = "rswc_" + secrets.token_urlsafe(32)
        digest = sha256_hex(credential)
        self.store.set_worker_credential(worker_id, digest)
        old = self._credentials.get(worker_id)
        if old is not None:
            self._worker_by_digest.pop(old, None)  # the old agent's credential stops working
        self._credentials[worker_id] = digest
        self._worker_by_digest[digest] = worker_id
        return credential

    def authenticate(self, metadata: tuple[tuple[str, str], ...]) -> Principal | None:
        """The caller behind ``authorization: Bearer <secret>``; None when there is none.

        Unknown or revoked secrets are Unauthenticated (never a silent anonymous call).
        """
        secret = bearer(metadata)
        if not secret:
            return None
        digest = sha256_hex(secret)
        principal = self._api_keys.get(digest)
        if principal is not None:
            return principal
        worker_id = self._worker_by_digest.get(digest)
        if worker_id is not None and worker_id in self.core.workers:
            return Principal(Role.WORKER, worker_id, self.core.worker(worker_id).farm_id)
        raise Unauthenticated("credential not recognised (revoked, or for another broker?)")

    def reload_api_keys(self) -> None:
        """Refresh the in-memory key ring from the store."""
        self._api_keys = {
            row.key_sha256: Principal(Role(row.role), row.principal, row.farm_id)
            for row in self.store.api_keys()
            if not row.revoked
        }

    def create_api_key(self, role: Role, principal: str, farm_id: str = "") -> tuple[str, str]:
        """Issue a key; returns (key id, secret). Only the hash is stored."""
        from broker.store import ApiKeyRow

        key_id, secret = new_api_key()
        self.store.add_api_key(
            ApiKeyRow(
                id=key_id,
                key_sha256=sha256_hex(secret),
                role=role.value,
                principal=principal,
                farm_id=farm_id,
                create_time=self.clock(),
            )
        )
        self.reload_api_keys()
        return key_id, secret

    # --- background loops ------------------------------------------------------------

    def start_loops(self, tick_interval_s: float) -> None:
        """Start the scheduling and lease-expiry loops (and tune the collector for a server)."""
        tune_gc()
        self._schedule_wanted.set()
        self._tasks = [
            asyncio.create_task(self._schedule_loop(), name="rigshift-schedule"),
            asyncio.create_task(self._tick_loop(tick_interval_s), name="rigshift-tick"),
            asyncio.create_task(self._database_loop(), name="rigshift-database"),
        ]

    async def stop_loops(self) -> None:
        """Stop the loops and end every open instruction stream."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for queue in self._streams.values():
            queue.put_nowait(None)

    async def _schedule_loop(self) -> None:
        while True:
            await self._schedule_wanted.wait()
            self._schedule_wanted.clear()
            if self._outage is not None:
                continue  # recovery asks for a pass again
            started = time.perf_counter()
            try:
                await self.apply(SchedulePass(now=self.clock()))
            except Unavailable:
                continue  # the database failed (logged once) or another replica leads
            except Exception:  # a bug; keep scheduling the rest of the time
                log.exception("scheduling pass failed")
                await asyncio.sleep(1.0)
                continue
            waiters, self._pass_waiters = self._pass_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            # A pass grows with the fleet (tens of ms at 10,000 rigs) and blocks the event
            # loop, which accepts RPCs only between callbacks. Rest SCHEDULE_REST times as
            # long as the pass took, so passes get at most a quarter of the loop and
            # submissions arriving meanwhile share the next pass (sub-ms on a small fleet).
            rest = SCHEDULE_REST * (time.perf_counter() - started)
            await asyncio.sleep(min(rest, SCHEDULE_REST_MAX_S))

    async def scheduled(self) -> None:
        """Ask for a scheduling pass and return once it has completed: every change made
        before the call has been through a pass. Tests wait on this instead of sleeping."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pass_waiters.append(waiter)
        self._schedule_wanted.set()
        await waiter

    async def _tick_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if self._outage is not None:
                continue  # no expiry that could not be written; leases are renewed meanwhile
            try:
                await self.apply(Tick(now=self.clock()))
            except Unavailable:
                pass  # the database failed (logged once) or another replica leads
            except Exception:
                log.exception("lease tick failed")


def curtail_pb(active: bool, end_time: float, reason: str) -> worker_service_pb2.Curtail:
    """The agent's ``Curtail``: a window began (``active``, until ``end_time``) or ended."""
    curtail = worker_service_pb2.Curtail(active=active, reason=reason)
    if active:
        curtail.end_time.FromNanoseconds(int(end_time * 1e9))
    return curtail


def cancellation(cmd: Cancel) -> worker_service_pb2.Instruction:
    """Instruction telling an agent to stop an attempt."""
    return worker_service_pb2.Instruction(
        cancellation=worker_service_pb2.Cancellation(
            job=f"jobs/{cmd.job_id}", attempt=cmd.attempt, reason=cmd.reason
        )
    )
