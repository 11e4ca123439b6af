"""The broker's pure core: a state machine over jobs, attempts and workers.

``BrokerCore.handle(event) -> list[Command]`` is the only way state changes.
No clock, socket, database or ``await`` in here (STYLE.md 1): ``now`` comes on
the event, the shell (``broker.service``) persists what ``take_dirty`` names
and carries out the commands.

Job lifecycle (PRODUCT.md, AIP-216)::

    PENDING ──place──▶ SCHEDULED ──started──▶ RUNNING ──exit 0──▶ SUCCEEDED
       ▲                  │  │                  │  │──exit≠0──▶ FAILED
       └──lease lost──────┘  │                  │  └──lease lost, no attempts left──▶ FAILED
       (attempts left)       └──────cancel──────┴──────────────────▶ CANCELLED

``TRANSITIONS`` is the table; anything else raises ``InvalidTransition``.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field, replace

from broker.economics import (
    FarmTerms,
    LedgerEntry,
    charge_micros,
    credit_for_seconds,
    floor_price,
    reliability_permille,
    settlement_entries,
)
from broker.errors import FailedPrecondition, InvalidTransition, NotFound
from broker.events import (
    AppendLog,
    Assign,
    AttemptCheckpointed,
    AttemptFinished,
    AttemptLog,
    AttemptOutputReported,
    AttemptPreparing,
    AttemptProgress,
    AttemptReport,
    AttemptStarted,
    Cancel,
    CancelRequested,
    Command,
    DrainRequested,
    Event,
    FarmConfigured,
    Heartbeat,
    JobSubmitted,
    SchedulePass,
    Tick,
    Transition,
    WorkerRegistered,
    WorkerTransition,
)
from broker.model import (
    LIVE_ATTEMPT_STATES,
    TERMINAL_JOB_STATES,
    AttemptState,
    GpuInfo,
    JobSpec,
    JobState,
    SetupCause,
    SlaKind,
    Tier,
    WorkerState,
)
from broker.policy import FIFO, Fifo, QueuedJob, ShortFirst
from broker.scheduler import (
    FleetIndex,
    GpuSlot,
    JobRequest,
    Rejection,
    SchedulingResult,
    Snapshot,
    WorkerCapacity,
)

__all__ = [
    "TRANSITIONS",
    "Attempt",
    "BrokerCore",
    "Gpu",
    "HistoryEntry",
    "Job",
    "SlaEvent",
    "Worker",
]

S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.PENDING: frozenset({S.SCHEDULED, S.CANCELLED}),
    S.SCHEDULED: frozenset({S.RUNNING, S.PENDING, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.PENDING, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


@dataclass(slots=True)
class HistoryEntry:
    """One state change of a job."""

    time: float
    from_state: JobState | None
    to_state: JobState
    reason: str


@dataclass(frozen=True, slots=True)
class AttemptOutput:
    """The archive of an attempt's ``$RIGSHIFT_OUTPUT_DIR`` as the agent reported it."""

    sha256: str  # empty when nothing was kept
    size_bytes: int
    time: float
    over_limit: bool = False
    message: str = ""


@dataclass(slots=True)
class Attempt:
    """One placement of a job on a worker's GPUs."""

    job_id: str
    number: int
    worker_id: str
    gpu_indices: tuple[int, ...]
    price_micros_per_gpu_hour: int
    schedule_time: float
    state: AttemptState = AttemptState.SCHEDULED
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    energy_joules: int = 0
    last_sequence: int = 0
    message: str = ""
    charge_micros: int = 0
    settled: bool = False
    last_checkpoint_time: float | None = None
    setup_ms: int = 0  # environment, inputs and working directory, before the process
    output: AttemptOutput | None = None  # what it wrote to $RIGSHIFT_OUTPUT_DIR, once reported

    @property
    def live(self) -> bool:
        """True while the attempt holds its GPUs."""
        return self.state in LIVE_ATTEMPT_STATES

    def gpu_milliseconds(self, now: float) -> int:
        """Wall-clock milliseconds the process ran, times its GPU count."""
        if self.start_time is None:
            return 0
        end = self.end_time if self.end_time is not None else now
        return max(0, round((end - self.start_time) * 1000)) * len(self.gpu_indices)


@dataclass(slots=True)
class SlaEvent:
    """Something that went against a job's SLA, and the credit it caused."""

    kind: SlaKind
    time: float
    attempt: int
    seconds: int
    credit_micros: int
    detail: str


@dataclass(slots=True)
class Job:
    """A job and everything that happened to it."""

    job_id: str
    owner: str
    spec: JobSpec
    create_time: float
    request_id: str = ""
    state: JobState = JobState.PENDING
    update_time: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)
    pending_reasons: tuple[Rejection, ...] = ()
    status_message: str = ""
    exit_code: int = 0
    sla_events: list[SlaEvent] = field(default_factory=list)
    credit_micros: int = 0
    checkpoint_sha256: str = ""
    checkpoint_time: float | None = None

    @property
    def current(self) -> Attempt | None:
        """The latest attempt, if any."""
        return self.attempts[-1] if self.attempts else None

    @property
    def counted_attempts(self) -> int:
        """Attempts that count against ``max_attempts`` (preemptions do not)."""
        return sum(1 for a in self.attempts if a.state != AttemptState.PREEMPTED)


@dataclass(slots=True)
class Gpu:
    """A GPU of a worker and the attempt holding it, if any."""

    info: GpuInfo
    holder: tuple[str, int] | None = None  # (job_id, attempt number)


@dataclass(slots=True)
class Worker:
    """A rig running the agent."""

    worker_id: str
    farm_id: str
    hostname: str
    agent_version: str
    state: WorkerState
    lease_expires_at: float
    last_heartbeat: float
    gpus: dict[int, Gpu] = field(default_factory=dict)
    metrics_address: str = ""
    first_seen: float = 0.0
    offline_since: float | None = None
    offline_log: list[tuple[float, float]] = field(default_factory=list)
    outcomes: list[tuple[float, bool]] = field(default_factory=list)  # (time, ok) per attempt
    # requirements_sha256 of the Python environments the rig holds; None until it says.
    environments: frozenset[str] | None = None


class BrokerCore:
    """All broker decisions. Feed events to :meth:`handle`; read state from the attributes."""

    def __init__(
        self,
        *,
        lease_ttl_s: float = 15.0,
        default_max_attempts: int = 3,
        spot_permille: int = 600,
        start_deadline_s: float = 60.0,
        reliability_window_s: float = 86400.0,
        default_fee_permille: int = 100,
        queue_policy: Fifo | ShortFirst = FIFO,
    ) -> None:
        self.lease_ttl_s = lease_ttl_s
        self.default_max_attempts = default_max_attempts
        self.spot_permille = spot_permille
        self.start_deadline_s = start_deadline_s
        self.reliability_window_s = reliability_window_s
        self.default_fee_permille = default_fee_permille
        self.queue_policy = queue_policy
        self.farms: dict[str, FarmTerms] = {}
        self.ledger: list[LedgerEntry] = []
        self.ledger_saved = 0  # entries before this index are in the store
        self.jobs: dict[str, Job] = {}
        self.workers: dict[str, Worker] = {}
        self.pending: dict[str, None] = {}  # ordered set of PENDING job ids
        self.requests: dict[tuple[str, str], str] = {}  # (owner, request_id) -> job_id
        self.needs_schedule = False
        self._dirty_jobs: set[str] = set()
        self._dirty_workers: set[str] = set()
        self._capacity: dict[str, WorkerCapacity] = {}
        # Caches that keep a pass from costing O(everything); none of them is a decision.
        self._queue: list[tuple[tuple, str]] = []  # (priority, job_id) sorted; may hold stale ids
        self._queued: set[str] = set()  # job ids with an entry in _queue
        self._requests: dict[str, JobRequest] = {}  # pending job -> what the scheduler sees
        self._slots: dict[tuple[int, str, int, int, bool], GpuSlot] = {}  # interned GpuSlots
        self._spot_live: dict[str, int] | None = None  # worker -> live spot attempts (lazy)
        # The scheduler's free-capacity index of the ONLINE workers, built at the first pass
        # and then brought up to date with the workers changed since (``_fleet_stale``).
        self._fleet: FleetIndex | None = None
        self._fleet_stale: set[str] = set()

    # --- entry point --------------------------------------------------------

    def handle(self, event: Event) -> list[Command]:
        """Apply one event and return the commands it causes, in order."""
        match event:
            case JobSubmitted():
                return self._submit(event)
            case CancelRequested():
                return self._cancel(event)
            case WorkerRegistered():
                return self._register(event)
            case Heartbeat():
                return self._heartbeat(event)
            case DrainRequested():
                return self._drain(event)
            case Tick():
                return self._tick(event)
            case SchedulePass():
                return self._schedule(event)
            case FarmConfigured():
                return self._configure_farm(event)
            case AttemptReport():
                return self._report(event)
        raise TypeError(f"unknown event {event!r}")

    def take_dirty(self) -> tuple[set[str], set[str]]:
        """Job ids and worker ids changed since the last call (the shell persists them)."""
        jobs, workers = self._dirty_jobs, self._dirty_workers
        self._dirty_jobs, self._dirty_workers = set(), set()
        return jobs, workers

    def is_duplicate(self, report: AttemptReport) -> bool:
        """True when this (job, attempt, sequence) was applied already."""
        job = self.jobs.get(report.job_id)
        if job is None or not 1 <= report.attempt <= len(job.attempts):
            return False
        return report.sequence <= job.attempts[report.attempt - 1].last_sequence

    def job(self, job_id: str) -> Job:
        """The job, or NotFound."""
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NotFound(f"job {job_id} not found", metadata={"job": job_id}) from None

    def worker(self, worker_id: str) -> Worker:
        """The worker, or NotFound."""
        try:
            return self.workers[worker_id]
        except KeyError:
            raise NotFound(
                f"worker {worker_id} not found", metadata={"worker": worker_id}
            ) from None

    def live_attempts(self, worker_id: str) -> list[tuple[Job, Attempt]]:
        """Attempts this worker should be running now (a cancelled job's are excluded)."""
        held = self._held_attempts(self.worker(worker_id))
        return [(job, a) for job, a in held if job.state not in TERMINAL_JOB_STATES]

    # --- jobs ---------------------------------------------------------------

    def _submit(self, ev: JobSubmitted) -> list[Command]:
        if ev.request_id and (ev.owner, ev.request_id) in self.requests:
            return []  # idempotent retry: the first job stands
        if ev.job_id in self.jobs:
            raise FailedPrecondition(f"job {ev.job_id} exists already")
        job = Job(
            ev.job_id, ev.owner, ev.spec, ev.now, request_id=ev.request_id, update_time=ev.now
        )
        self.jobs[job.job_id] = job
        if ev.request_id:
            self.requests[(ev.owner, ev.request_id)] = job.job_id
        job.history.append(HistoryEntry(ev.now, None, S.PENDING, "submitted"))
        self.pending[job.job_id] = None
        self._enqueue(job)
        self._dirty_jobs.add(job.job_id)
        self.needs_schedule = True
        return [Transition(job.job_id, None, S.PENDING, "submitted")]

    def _transition(self, job: Job, to: JobState, now: float, reason: str) -> Transition:
        if to not in TRANSITIONS[job.state]:
            history = [f"{h.from_state}->{h.to_state} ({h.reason})" for h in job.history]
            raise InvalidTransition(job.job_id, job.state, to, history)
        cmd = Transition(job.job_id, job.state, to, reason)
        job.history.append(HistoryEntry(now, job.state, to, reason))
        job.state = to
        job.update_time = now
        if to == S.PENDING:
            self.pending[job.job_id] = None
            self._enqueue(job)
            self.needs_schedule = True
        else:
            self.pending.pop(job.job_id, None)  # its _queue entry goes at the next snapshot
            self._requests.pop(job.job_id, None)
        if to in TERMINAL_JOB_STATES or to == S.SCHEDULED:
            job.pending_reasons = ()
        if to in TERMINAL_JOB_STATES:
            job.status_message = reason
        self._dirty_jobs.add(job.job_id)
        return cmd

    def _cancel(self, ev: CancelRequested) -> list[Command]:
        job = self.job(ev.job_id)
        if job.state == S.CANCELLED:
            return []
        if job.state in TERMINAL_JOB_STATES:
            raise FailedPrecondition(
                f"job {job.job_id} already finished as {job.state}",
                reason="JOB_FINISHED",
                metadata={"job": job.job_id, "state": job.state},
            )
        cmds: list[Command] = [self._transition(job, S.CANCELLED, ev.now, "cancelled by client")]
        attempt = job.current
        if attempt is not None and attempt.live:
            worker = self.workers[attempt.worker_id]
            if worker.state == WorkerState.OFFLINE:
                self._end_attempt(attempt, AttemptState.CANCELLED, ev.now, "cancelled")
            else:
                # GPUs stay held until the agent confirms the process is gone.
                cmds.append(Cancel(worker.worker_id, job.job_id, attempt.number, "cancelled"))
        return cmds

    # --- workers ------------------------------------------------------------

    def _register(self, ev: WorkerRegistered) -> list[Command]:
        old = self.workers.get(ev.worker_id)
        cmds: list[Command] = []
        if old is not None:
            # Registering again means a new agent process: whatever the old one ran is gone.
            for job, attempt in self._held_attempts(old):
                cmds += self._lose_attempt(job, attempt, ev.now, "agent restarted")
        worker = Worker(
            ev.worker_id,
            ev.farm_id,
            ev.hostname,
            ev.agent_version,
            WorkerState.ONLINE,
            lease_expires_at=ev.now + self.lease_ttl_s,
            last_heartbeat=ev.now,
            gpus={g.index: Gpu(self._priced(ev.farm_id, g)) for g in ev.gpus},
            metrics_address=ev.metrics_address,
            first_seen=old.first_seen if old else ev.now,
            offline_log=old.offline_log if old else [],
            outcomes=old.outcomes if old else [],
        )
        if old is not None and old.offline_since is not None:
            worker.offline_log.append((old.offline_since, ev.now))
        self.workers[ev.worker_id] = worker
        self._worker_changed(worker.worker_id)
        self.needs_schedule = True
        prev = old.state if old else None
        if prev != WorkerState.ONLINE:
            cmds.insert(0, WorkerTransition(worker.worker_id, prev, WorkerState.ONLINE))
        return cmds

    def _held_attempts(self, worker: Worker) -> list[tuple[Job, Attempt]]:
        """Live attempts holding this worker's GPUs, each once, in GPU order."""
        out: list[tuple[Job, Attempt]] = []
        seen: set[tuple[str, int]] = set()
        for index in sorted(worker.gpus):
            holder = worker.gpus[index].holder
            if holder is None or holder in seen:
                continue
            seen.add(holder)
            job = self.jobs[holder[0]]
            out.append((job, job.attempts[holder[1] - 1]))
        return out

    def _priced(self, farm_id: str, info: GpuInfo) -> GpuInfo:
        """The farm's ask for the model wins; an agent's own ask is lifted to the floor."""
        terms = self.farms.get(farm_id)
        if terms is None:
            return info
        ask = terms.ask_for(info.model)
        if ask is None:
            floor = floor_price(terms, info.model, info.power_limit_watts or None)
            ask = max(info.price_micros_per_gpu_hour, floor.floor_micros)
        return replace(info, price_micros_per_gpu_hour=ask)

    def _configure_farm(self, ev: FarmConfigured) -> list[Command]:
        self.farms[ev.terms.farm_id] = ev.terms
        for worker in self.workers.values():
            if worker.farm_id != ev.terms.farm_id:
                continue
            for gpu in worker.gpus.values():
                gpu.info = self._priced(worker.farm_id, gpu.info)
            self._worker_changed(worker.worker_id)
        self.needs_schedule = True
        return []

    def reliability(self, worker: Worker, now: float) -> int:
        """Reliability of a worker over the recent window, in thousandths.

        Outcomes and offline spans that ended before the window can never count again
        (events only move the clock forward), so they are dropped here: the history kept,
        and persisted, is the window's, not every attempt the rig ever ran.
        """
        horizon = now - self.reliability_window_s
        outcomes = worker.outcomes
        if outcomes and outcomes[0][0] < horizon:
            del outcomes[: bisect_left(outcomes, (horizon,))]
        log = worker.offline_log
        if log and log[0][1] < horizon:
            worker.offline_log = [span for span in log if span[1] >= horizon]
        start = max(horizon, worker.first_seen)
        spans = [*worker.offline_log]
        if worker.offline_since is not None:
            spans.append((worker.offline_since, now))
        offline = sum(max(0.0, min(b, now) - max(a, start)) for a, b in spans)
        recent = [ok for t, ok in worker.outcomes if t >= start]
        ok = sum(recent)
        return reliability_permille(now - start, offline, ok, len(recent) - ok)

    def _heartbeat(self, ev: Heartbeat) -> list[Command]:
        worker = self.worker(ev.worker_id)
        worker.lease_expires_at = ev.now + self.lease_ttl_s
        worker.last_heartbeat = ev.now
        if ev.environments is not None and frozenset(ev.environments) != worker.environments:
            worker.environments = frozenset(ev.environments)
            self._worker_changed(worker.worker_id)  # the locality score reads them
        if worker.state == WorkerState.OFFLINE:
            if worker.offline_since is not None:
                worker.offline_log.append((worker.offline_since, ev.now))
                worker.offline_since = None
            worker.state = WorkerState.ONLINE
            self._worker_changed(worker.worker_id)
            self.needs_schedule = True
            return [WorkerTransition(worker.worker_id, WorkerState.OFFLINE, WorkerState.ONLINE)]
        return []

    def _drain(self, ev: DrainRequested) -> list[Command]:
        worker = self.worker(ev.worker_id)
        if worker.state != WorkerState.ONLINE:
            return []
        worker.state = WorkerState.DRAINING
        self._worker_changed(worker.worker_id)
        return [WorkerTransition(worker.worker_id, WorkerState.ONLINE, WorkerState.DRAINING)]

    def _tick(self, ev: Tick) -> list[Command]:
        cmds: list[Command] = []
        for worker in self.workers.values():
            if worker.state == WorkerState.OFFLINE or worker.lease_expires_at > ev.now:
                continue
            cmds.append(WorkerTransition(worker.worker_id, worker.state, WorkerState.OFFLINE))
            worker.state = WorkerState.OFFLINE
            worker.offline_since = worker.last_heartbeat
            self._worker_changed(worker.worker_id)
            gap = int(ev.now - worker.last_heartbeat)
            for job, attempt in self._held_attempts(worker):
                if job.current is attempt and job.state in (S.SCHEDULED, S.RUNNING):
                    detail = f"no heartbeat from {worker.worker_id} for {gap} s"
                    self._sla(job, SlaKind.HEARTBEAT_GAP, attempt.number, gap, 0, detail, ev.now)
                cmds += self._lose_attempt(job, attempt, ev.now, "worker lease expired")
        return cmds

    def _lose_attempt(self, job: Job, attempt: Attempt, now: float, why: str) -> list[Command]:
        self._end_attempt(attempt, AttemptState.LOST, now, why)
        if job.state not in (S.SCHEDULED, S.RUNNING) or job.current is not attempt:
            return []
        self._interrupted(job, attempt, now, why)
        n = job.counted_attempts
        if n < job.spec.max_attempts:
            return [self._transition(job, S.PENDING, now, f"{why}; requeued after attempt {n}")]
        reason = f"{why}; no attempts left ({n}/{job.spec.max_attempts})"
        return [self._transition(job, S.FAILED, now, reason)]

    def _interrupted(self, job: Job, attempt: Attempt, now: float, why: str) -> None:
        """SLA events of an interruption; a guaranteed job is credited its lost work."""
        self._sla(job, SlaKind.INTERRUPTION, attempt.number, 0, 0, why, now)
        if attempt.start_time is None or attempt.end_time is None:
            return
        since = attempt.last_checkpoint_time or attempt.start_time
        lost_s = max(0.0, attempt.end_time - since)
        credit = 0
        if job.spec.tier == Tier.GUARANTEED:
            n = len(attempt.gpu_indices)
            credit = credit_for_seconds(lost_s, n, attempt.price_micros_per_gpu_hour)
        what = "the last checkpoint" if attempt.last_checkpoint_time else "the start"
        detail = f"{int(lost_s)} s of work since {what} lost"
        self._sla(job, SlaKind.LOST_WORK, attempt.number, int(lost_s), credit, detail, now)

    def _sla(
        self,
        job: Job,
        kind: SlaKind,
        attempt: int,
        seconds: int,
        credit: int,
        detail: str,
        now: float,
    ) -> None:
        job.sla_events.append(SlaEvent(kind, now, attempt, seconds, credit, detail))
        self._dirty_jobs.add(job.job_id)
        if credit > 0:
            job.credit_micros += credit
            txn = f"credit:{job.job_id}:{attempt}:{kind.value}:{len(job.sla_events)}"
            self._post(
                [
                    LedgerEntry(
                        txn, f"client:{job.owner}", credit, "sla_credit", job.job_id, attempt, now
                    ),
                    LedgerEntry(
                        txn, "broker:sla_credits", -credit, "sla_credit", job.job_id, attempt, now
                    ),
                ]
            )

    def _post(self, entries: list[LedgerEntry]) -> None:
        if sum(e.amount_micros for e in entries) != 0:
            raise AssertionError(f"unbalanced transaction {entries[0].txn}")
        self.ledger.extend(entries)

    def _end_attempt(
        self, attempt: Attempt, state: AttemptState, now: float, msg: str, rig_fault: bool = False
    ) -> None:
        worker = self.workers[attempt.worker_id]
        attempt.state = state
        attempt.end_time = now
        if state == AttemptState.LOST and attempt.start_time is not None:
            # Bill a lost attempt only up to the last moment the rig proved it was alive.
            attempt.end_time = max(attempt.start_time, min(now, worker.last_heartbeat))
        attempt.message = msg
        for index in attempt.gpu_indices:
            gpu = worker.gpus.get(index)
            if gpu is not None and gpu.holder == (attempt.job_id, attempt.number):
                gpu.holder = None
        if state != AttemptState.PREEMPTED:
            worker.outcomes.append((now, state != AttemptState.LOST and not rig_fault))
        if self._spot_live is not None and self.jobs[attempt.job_id].spec.tier == Tier.SPOT:
            left = self._spot_live[worker.worker_id] - 1
            if left:
                self._spot_live[worker.worker_id] = left
            else:
                del self._spot_live[worker.worker_id]
        self._settle(self.jobs[attempt.job_id], attempt, now)
        self._worker_changed(worker.worker_id)
        self._dirty_jobs.add(attempt.job_id)
        self.needs_schedule = True

    def _settle(self, job: Job, attempt: Attempt, now: float) -> None:
        """Charge the client for the GPU time the attempt ran; exactly once per attempt."""
        if attempt.settled:
            raise AssertionError(f"attempt {job.job_id}#{attempt.number} settled twice")
        charge = charge_micros(attempt.gpu_milliseconds(now), attempt.price_micros_per_gpu_hour)
        farm_id = self.workers[attempt.worker_id].farm_id
        terms = self.farms.get(farm_id)
        fee = terms.broker_fee_permille if terms else self.default_fee_permille
        self._post(
            settlement_entries(
                owner=job.owner,
                farm_id=farm_id,
                job_id=job.job_id,
                attempt=attempt.number,
                charge=charge,
                fee_permille=fee,
                now=now,
            )
        )
        attempt.charge_micros = charge
        attempt.settled = True

    def _worker_changed(self, worker_id: str) -> None:
        """Everything that changes what ``_capacity_of`` would give (GPUs held or freed,
        state, prices, reliability) calls this: the store saves the worker, and the capacity
        cache and the scheduler's index take it up again at the next pass."""
        self._dirty_workers.add(worker_id)
        self._capacity.pop(worker_id, None)
        if self._fleet is not None:
            self._fleet_stale.add(worker_id)

    # --- agent reports --------------------------------------------------------

    def _report(self, ev: AttemptReport) -> list[Command]:
        job = self.jobs.get(ev.job_id)
        attempt = None
        if job is not None and 1 <= ev.attempt <= len(job.attempts):
            attempt = job.attempts[ev.attempt - 1]
        if job is None or attempt is None or attempt.worker_id != ev.worker_id:
            return [Cancel(ev.worker_id, ev.job_id, ev.attempt, "unknown attempt")]
        if ev.sequence <= attempt.last_sequence:
            return []
        attempt.last_sequence = ev.sequence
        self._dirty_jobs.add(job.job_id)
        if not attempt.live:
            # The broker gave up on this attempt (lease lost); a finished report is fine.
            if isinstance(ev, AttemptFinished):
                return []
            return [Cancel(ev.worker_id, ev.job_id, ev.attempt, f"attempt {attempt.state}")]
        match ev:
            case AttemptPreparing():
                if attempt.state == AttemptState.SCHEDULED:
                    attempt.state = AttemptState.PREPARING
                return []
            case AttemptStarted():
                attempt.setup_ms = max(0, ev.setup_ms)
                return self._started(job, attempt, ev.now)
            case AttemptOutputReported():
                attempt.output = AttemptOutput(
                    ev.sha256, max(0, ev.size_bytes), ev.now, ev.over_limit, ev.message
                )
                return []
            case AttemptLog():
                return [AppendLog(job.job_id, attempt.number, ev.sequence, ev.data)]
            case AttemptProgress():
                attempt.energy_joules = max(attempt.energy_joules, ev.energy_joules)
                return []
            case AttemptCheckpointed():
                job.checkpoint_sha256 = ev.sha256
                job.checkpoint_time = ev.now
                attempt.last_checkpoint_time = ev.now
                return []
            case AttemptFinished():
                return self._finished(job, attempt, ev)
        raise TypeError(f"unknown report {ev!r}")

    def _started(self, job: Job, attempt: Attempt, now: float) -> list[Command]:
        if attempt.state not in (AttemptState.SCHEDULED, AttemptState.PREPARING):
            return []
        attempt.state = AttemptState.RUNNING
        attempt.start_time = now
        if job.state == S.SCHEDULED:
            return [self._transition(job, S.RUNNING, now, f"started on {attempt.worker_id}")]
        return []

    def _finished(self, job: Job, attempt: Attempt, ev: AttemptFinished) -> list[Command]:
        cmds: list[Command] = []
        if ev.setup_ms:
            attempt.setup_ms = ev.setup_ms
        if ev.cause is None and attempt.start_time is None:
            attempt.start_time = ev.now
        attempt.exit_code = ev.exit_code
        attempt.energy_joules = max(attempt.energy_joules, ev.energy_joules)
        if job.state == S.CANCELLED:
            self._end_attempt(attempt, AttemptState.CANCELLED, ev.now, ev.message or "cancelled")
            return cmds
        if ev.cause is not None and attempt.start_time is None:
            return self._setup_failed(job, attempt, ev)
        if job.state == S.SCHEDULED:
            cmds.append(self._transition(job, S.RUNNING, ev.now, "finished before start report"))
        ok = ev.exit_code == 0
        state = AttemptState.SUCCEEDED if ok else AttemptState.FAILED
        self._end_attempt(attempt, state, ev.now, ev.message)
        job.exit_code = ev.exit_code
        if ok:
            cmds.append(self._transition(job, S.SUCCEEDED, ev.now, "exited with status 0"))
        else:
            why = ev.message or f"exited with status {ev.exit_code}"
            cmds.append(self._transition(job, S.FAILED, ev.now, why))
        return cmds

    def _setup_failed(self, job: Job, attempt: Attempt, ev: AttemptFinished) -> list[Command]:
        """Setup failed before the process started (no GPU time to charge). The client's
        fault fails the job at once; the rig's requeues it while attempts are left."""
        why = f"setup failed: {ev.message}" if ev.message else "setup failed"
        rig = ev.cause == SetupCause.SETUP_RIG
        self._end_attempt(attempt, AttemptState.FAILED, ev.now, why, rig_fault=rig)
        job.exit_code = ev.exit_code
        n = job.counted_attempts
        if rig and n < job.spec.max_attempts:
            reason = f"{why} (the rig's fault); requeued after attempt {n}"
            return [self._transition(job, S.PENDING, ev.now, reason)]
        if rig:
            why += f" (the rig's fault); no attempts left ({n}/{job.spec.max_attempts})"
        return [self._transition(job, S.FAILED, ev.now, why)]

    # --- scheduling -----------------------------------------------------------

    def snapshot(self, now: float) -> Snapshot:
        """The frozen view the scheduler sees: pending jobs in ``queue_policy`` order
        (guaranteed before spot), ONLINE workers.

        A scheduling pass does not build this (it keeps a :class:`FleetIndex`); QuoteJob and
        tests do, and a subclass may override it to show the scheduler another view.
        """
        workers = tuple(
            self._capacity_of(w, now)
            for w in self.workers.values()
            if w.state == WorkerState.ONLINE
        )
        return Snapshot(now=now, pending=self._pending_requests(), workers=workers)

    def _pending_requests(self) -> tuple[JobRequest, ...]:
        """PENDING jobs as the scheduler sees them, in ``queue_policy`` order.

        Priorities are fixed when a job is submitted, so the queue is kept sorted as jobs
        enter it (``_enqueue``) and only compacted here: no sort per pass.
        """
        pending = self.pending
        queue = self._queue
        live = [e for e in queue if e[1] in pending]
        if len(live) != len(pending):  # PENDING jobs the core did not enqueue (Store.load)
            live = sorted((self._priority(self.jobs[j]), j) for j in pending)
            self._queued = set(pending)
        elif len(live) != len(queue):
            self._queued.difference_update(e[1] for e in queue if e[1] not in pending)
        self._queue = live
        requests = self._requests
        order = []
        for _, job_id in live:
            request = requests.get(job_id)
            if request is None:
                request = requests[job_id] = self._request(self.jobs[job_id])
            order.append(request)
        return tuple(order)

    def _priority(self, job: Job) -> tuple:
        """Sort key of a pending job under ``queue_policy``; smallest first. It depends only
        on what is fixed at submission (a requeued job keeps its place)."""
        s = job.spec
        queued = QueuedJob(
            job.job_id, job.create_time, s.gpu_count, s.max_duration_seconds, s.tier == Tier.SPOT
        )
        return self.queue_policy.key(queued)

    def _enqueue(self, job: Job) -> None:
        if job.job_id not in self._queued:  # else its entry is still in _queue, same key
            self._queued.add(job.job_id)
            insort(self._queue, (self._priority(job), job.job_id))

    def _request(self, job: Job) -> JobRequest:
        s = job.spec
        cap = s.max_price_micros_per_gpu_hour
        if cap and s.tier == Tier.SPOT:
            cap = cap * 1000 // self.spot_permille  # the cap applies to the discounted price
        return JobRequest(
            job.job_id, s.gpu_count, s.gpu_model, s.min_vram_mb, cap, s.requirements_sha256
        )

    def price_for(self, job: Job, ask_micros: int, floor_micros: int = 0) -> int:
        """What a job pays per GPU-hour on a GPU with this ask: spot is discounted, but
        never below the farm's floor (what the GPU would earn mining or cost in power)."""
        if job.spec.tier == Tier.SPOT:
            return min(ask_micros, max(ask_micros * self.spot_permille // 1000, floor_micros))
        return ask_micros

    def floor_of(self, worker: Worker, index: int) -> int:
        """Floor price per GPU-hour of one GPU (0 when its farm set no terms)."""
        terms = self.farms.get(worker.farm_id)
        if terms is None:
            return 0
        info = worker.gpus[index].info
        return floor_price(terms, info.model, info.power_limit_watts or None).floor_micros

    def _capacity_of(self, worker: Worker, now: float) -> WorkerCapacity:
        """The worker as the scheduler sees it; cached until ``_worker_changed``. GpuSlots
        are frozen values, interned, so a rebuild allocates only the tuple."""
        cap = self._capacity.get(worker.worker_id)
        if cap is None:
            interned = self._slots
            slots = []
            for gpu in sorted(worker.gpus.values(), key=lambda g: g.info.index):
                i = gpu.info
                key = (i.index, i.model, i.vram_mb, i.price_micros_per_gpu_hour, gpu.holder is None)
                slot = interned.get(key)
                if slot is None:
                    slot = interned[key] = GpuSlot(*key)
                slots.append(slot)
            cap = WorkerCapacity(
                worker.worker_id,
                tuple(slots),
                self.reliability(worker, now),
                worker.environments or frozenset(),
            )
            self._capacity[worker.worker_id] = cap
        return cap

    def _place(self, now: float) -> SchedulingResult:
        """The pass's decisions: ``place(self.snapshot(now))``, computed on the kept
        :class:`FleetIndex` so that it costs what changed since the last pass, not the fleet.

        The index takes the GPUs it places; ``_bind`` then marks those workers changed, so the
        next pass re-reads them from the truth. A subclass with a snapshot of its own (the
        trace replay's lean view) overrides this with ``place(self.snapshot(now))``.
        """
        fleet = self._fleet
        if fleet is None:
            online = (w for w in self.workers.values() if w.state == WorkerState.ONLINE)
            fleet = self._fleet = FleetIndex(self._capacity_of(w, now) for w in online)
        else:
            for worker_id in self._fleet_stale:
                worker = self.workers.get(worker_id)
                if worker is not None and worker.state == WorkerState.ONLINE:
                    fleet.update(self._capacity_of(worker, now))
                else:
                    fleet.remove(worker_id)
        self._fleet_stale.clear()
        return fleet.place(self._pending_requests())

    def _schedule(self, ev: SchedulePass) -> list[Command]:
        self.needs_schedule = False
        if not self.pending:
            return []
        result = self._place(ev.now)
        cmds: list[Command] = []
        for p in result.placements:
            cmds += self._bind(
                self.jobs[p.job_id], p.worker_id, p.gpu_indices, p.price_micros_per_gpu_hour, ev.now
            )
        for u in result.unplaced:
            job = self.jobs[u.job_id]
            reason = u.reasons[0] if u.reasons else None
            if (
                job.spec.tier == Tier.GUARANTEED
                and reason is not None
                and reason.resource == "gpu_count"
                and reason.resolvable
            ):
                plan = self._preemption_plan(job)
                if plan is not None:
                    worker_id, indices, ask, victims = plan
                    for vjob, vattempt in victims:
                        cmds += self._preempt(vjob, vattempt, job, ev.now)
                    cmds += self._bind(job, worker_id, indices, ask, ev.now)
                    continue
            if job.pending_reasons != u.reasons:
                job.pending_reasons = u.reasons
                self._dirty_jobs.add(job.job_id)
        return cmds

    def _bind(
        self, job: Job, worker_id: str, indices: tuple[int, ...], ask: int, now: float
    ) -> list[Command]:
        """The only step of scheduling that writes: hold the GPUs, open an attempt."""
        price = self.price_for(job, ask, self.floor_of(self.workers[worker_id], indices[0]))
        if not job.attempts and job.spec.tier == Tier.GUARANTEED:
            delay = now - job.create_time - self.start_deadline_s
            if delay > 0:
                # Credit only when waiting was the fleet's fault, not an impossible spec.
                fault = all(r.resolvable for r in job.pending_reasons)
                credit = credit_for_seconds(delay, len(indices), price) if fault else 0
                detail = f"started {int(delay)} s after its {int(self.start_deadline_s)} s deadline"
                self._sla(job, SlaKind.START_DEADLINE_MISSED, 1, int(delay), credit, detail, now)
        attempt = Attempt(job.job_id, len(job.attempts) + 1, worker_id, indices, price, now)
        job.attempts.append(attempt)
        worker = self.workers[worker_id]
        for index in indices:
            worker.gpus[index].holder = (job.job_id, attempt.number)
        if self._spot_live is not None and job.spec.tier == Tier.SPOT:
            self._spot_live[worker_id] = self._spot_live.get(worker_id, 0) + 1
        self._worker_changed(worker_id)
        gpus = ",".join(map(str, indices))
        reason = f"placed on {worker_id} GPUs {gpus} (attempt {attempt.number})"
        return [
            self._transition(job, S.SCHEDULED, now, reason),
            Assign(worker_id, job.job_id, attempt.number, indices),
        ]

    def _preemption_plan(
        self, job: Job
    ) -> tuple[str, tuple[int, ...], int, list[tuple[Job, Attempt]]] | None:
        """Cheapest way to make room for a guaranteed job by preempting spot attempts:
        fewest victims, then lowest ask, then worker id. None when no worker can.

        Only workers running a spot attempt can offer a victim, so only those are scanned
        (``_spot_workers``): nothing at all while no spot job runs."""
        spec = job.spec
        best: tuple[tuple[int, int, str], str, tuple[int, ...], int, list] | None = None
        for worker_id in self._spot_workers():
            worker = self.workers[worker_id]
            if worker.state != WorkerState.ONLINE:
                continue
            groups: dict[tuple[str, int, int], list[Gpu]] = {}
            for gpu in worker.gpus.values():
                i = gpu.info
                if spec.gpu_model and i.model != spec.gpu_model:
                    continue
                if i.vram_mb < spec.min_vram_mb:
                    continue
                cap = spec.max_price_micros_per_gpu_hour
                if cap and i.price_micros_per_gpu_hour > cap:
                    continue
                groups.setdefault((i.model, i.vram_mb, i.price_micros_per_gpu_hour), []).append(gpu)
            for (_, _, ask), gpus in groups.items():
                free = sorted(g.info.index for g in gpus if g.holder is None)
                victims: dict[tuple[str, int], list[int]] = {}
                for g in gpus:
                    if g.holder is None:
                        continue
                    vjob = self.jobs[g.holder[0]]
                    if vjob.spec.tier == Tier.SPOT and vjob.state in (S.SCHEDULED, S.RUNNING):
                        victims.setdefault(g.holder, []).append(g.info.index)
                # Least progress lost first: the most recently scheduled spot attempts.
                order = sorted(
                    victims,
                    key=lambda h: (-self.jobs[h[0]].attempts[h[1] - 1].schedule_time, h),
                )
                chosen: list[tuple[str, int]] = []
                room = list(free)
                for holder in order:
                    if len(room) >= spec.gpu_count:
                        break
                    chosen.append(holder)
                    room += victims[holder]
                if len(room) < spec.gpu_count or not chosen:
                    continue
                key = (len(chosen), ask, worker.worker_id)
                if best is None or key < best[0]:
                    indices = tuple(sorted(room)[: spec.gpu_count])
                    pairs = [(self.jobs[h[0]], self.jobs[h[0]].attempts[h[1] - 1]) for h in chosen]
                    best = (key, worker.worker_id, indices, ask, pairs)
        if best is None:
            return None
        return best[1], best[2], best[3], best[4]

    def _spot_workers(self) -> dict[str, int]:
        """Worker id -> live spot attempts on it. Built on first use from the GPU holders
        (so a core that ``Store.load`` filled directly is counted), then kept by
        ``_bind`` and ``_end_attempt``."""
        if self._spot_live is None:
            live: dict[str, int] = {}
            for worker in self.workers.values():
                for job, _ in self._held_attempts(worker):
                    if job.spec.tier == Tier.SPOT:
                        live[worker.worker_id] = live.get(worker.worker_id, 0) + 1
            self._spot_live = live
        return self._spot_live

    def _preempt(self, victim: Job, attempt: Attempt, by: Job, now: float) -> list[Command]:
        why = f"preempted by guaranteed job {by.job_id}"
        self._end_attempt(attempt, AttemptState.PREEMPTED, now, why)
        self._interrupted(victim, attempt, now, why)
        return [
            self._transition(victim, S.PENDING, now, why),
            Cancel(attempt.worker_id, victim.job_id, attempt.number, why),
        ]
