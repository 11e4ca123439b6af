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

from dataclasses import dataclass, field

from broker.errors import FailedPrecondition, InvalidTransition, NotFound
from broker.events import (
    AppendLog,
    Assign,
    AttemptFinished,
    AttemptLog,
    AttemptProgress,
    AttemptReport,
    AttemptStarted,
    Cancel,
    CancelRequested,
    Command,
    DrainRequested,
    Event,
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
    WorkerState,
)
from broker.scheduler import (
    GpuSlot,
    JobRequest,
    Rejection,
    Snapshot,
    WorkerCapacity,
    place,
)

__all__ = ["TRANSITIONS", "Attempt", "BrokerCore", "Gpu", "HistoryEntry", "Job", "Worker"]

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

    @property
    def current(self) -> Attempt | None:
        """The latest attempt, if any."""
        return self.attempts[-1] if self.attempts else None


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


class BrokerCore:
    """All broker decisions. Feed events to :meth:`handle`; read state from the attributes."""

    def __init__(self, *, lease_ttl_s: float = 15.0, default_max_attempts: int = 3) -> None:
        self.lease_ttl_s = lease_ttl_s
        self.default_max_attempts = default_max_attempts
        self.jobs: dict[str, Job] = {}
        self.workers: dict[str, Worker] = {}
        self.pending: dict[str, None] = {}  # ordered set of PENDING job ids
        self.requests: dict[tuple[str, str], str] = {}  # (owner, request_id) -> job_id
        self.needs_schedule = False
        self._dirty_jobs: set[str] = set()
        self._dirty_workers: set[str] = set()
        self._capacity: dict[str, WorkerCapacity] = {}

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
            self.needs_schedule = True
        else:
            self.pending.pop(job.job_id, None)
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
            gpus={g.index: Gpu(g) for g in ev.gpus},
            metrics_address=ev.metrics_address,
        )
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

    def _heartbeat(self, ev: Heartbeat) -> list[Command]:
        worker = self.worker(ev.worker_id)
        worker.lease_expires_at = ev.now + self.lease_ttl_s
        worker.last_heartbeat = ev.now
        if worker.state == WorkerState.OFFLINE:
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
            self._worker_changed(worker.worker_id)
            for job, attempt in self._held_attempts(worker):
                cmds += self._lose_attempt(job, attempt, ev.now, "worker lease expired")
        return cmds

    def _lose_attempt(self, job: Job, attempt: Attempt, now: float, why: str) -> list[Command]:
        self._end_attempt(attempt, AttemptState.LOST, now, why)
        if job.state not in (S.SCHEDULED, S.RUNNING) or job.current is not attempt:
            return []
        if len(job.attempts) < job.spec.max_attempts:
            n = len(job.attempts)
            return [self._transition(job, S.PENDING, now, f"{why}; requeued after attempt {n}")]
        reason = f"{why}; no attempts left ({len(job.attempts)}/{job.spec.max_attempts})"
        return [self._transition(job, S.FAILED, now, reason)]

    def _end_attempt(self, attempt: Attempt, state: AttemptState, now: float, msg: str) -> None:
        attempt.state = state
        attempt.end_time = now
        attempt.message = msg
        worker = self.workers[attempt.worker_id]
        for index in attempt.gpu_indices:
            gpu = worker.gpus.get(index)
            if gpu is not None and gpu.holder == (attempt.job_id, attempt.number):
                gpu.holder = None
        self._worker_changed(worker.worker_id)
        self._dirty_jobs.add(attempt.job_id)
        self.needs_schedule = True

    def _worker_changed(self, worker_id: str) -> None:
        self._dirty_workers.add(worker_id)
        self._capacity.pop(worker_id, None)

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
            case AttemptStarted():
                return self._started(job, attempt, ev.now)
            case AttemptLog():
                return [AppendLog(job.job_id, attempt.number, ev.sequence, ev.data)]
            case AttemptProgress():
                attempt.energy_joules = max(attempt.energy_joules, ev.energy_joules)
                return []
            case AttemptFinished():
                return self._finished(job, attempt, ev)
        raise TypeError(f"unknown report {ev!r}")

    def _started(self, job: Job, attempt: Attempt, now: float) -> list[Command]:
        if attempt.state != AttemptState.SCHEDULED:
            return []
        attempt.state = AttemptState.RUNNING
        attempt.start_time = now
        if job.state == S.SCHEDULED:
            return [self._transition(job, S.RUNNING, now, f"started on {attempt.worker_id}")]
        return []

    def _finished(self, job: Job, attempt: Attempt, ev: AttemptFinished) -> list[Command]:
        cmds: list[Command] = []
        if attempt.start_time is None:
            attempt.start_time = ev.now
        attempt.exit_code = ev.exit_code
        attempt.energy_joules = max(attempt.energy_joules, ev.energy_joules)
        if job.state == S.CANCELLED:
            self._end_attempt(attempt, AttemptState.CANCELLED, ev.now, ev.message or "cancelled")
            return cmds
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

    # --- scheduling -----------------------------------------------------------

    def snapshot(self, now: float) -> Snapshot:
        """The frozen view the scheduler sees: pending jobs FIFO, ONLINE workers."""
        order = sorted(self.pending, key=lambda j: (self.jobs[j].create_time, j))
        pending = tuple(self._request(self.jobs[j]) for j in order)
        workers = tuple(
            self._capacity_of(w) for w in self.workers.values() if w.state == WorkerState.ONLINE
        )
        return Snapshot(now=now, pending=pending, workers=workers)

    def _request(self, job: Job) -> JobRequest:
        s = job.spec
        return JobRequest(
            job.job_id, s.gpu_count, s.gpu_model, s.min_vram_mb, s.max_price_micros_per_gpu_hour
        )

    def _capacity_of(self, worker: Worker) -> WorkerCapacity:
        cap = self._capacity.get(worker.worker_id)
        if cap is None:
            slots = tuple(
                GpuSlot(
                    g.info.index,
                    g.info.model,
                    g.info.vram_mb,
                    g.info.price_micros_per_gpu_hour,
                    g.holder is None,
                )
                for g in sorted(worker.gpus.values(), key=lambda g: g.info.index)
            )
            cap = self._capacity[worker.worker_id] = WorkerCapacity(worker.worker_id, slots)
        return cap

    def _schedule(self, ev: SchedulePass) -> list[Command]:
        self.needs_schedule = False
        if not self.pending:
            return []
        result = place(self.snapshot(ev.now))
        cmds: list[Command] = []
        for p in result.placements:
            job = self.jobs[p.job_id]
            attempt = Attempt(
                job.job_id,
                len(job.attempts) + 1,
                p.worker_id,
                p.gpu_indices,
                p.price_micros_per_gpu_hour,
                schedule_time=ev.now,
            )
            job.attempts.append(attempt)
            worker = self.workers[p.worker_id]
            for index in p.gpu_indices:
                worker.gpus[index].holder = (job.job_id, attempt.number)
            self._worker_changed(worker.worker_id)
            gpus = ",".join(map(str, p.gpu_indices))
            reason = f"placed on {p.worker_id} GPUs {gpus} (attempt {attempt.number})"
            cmds.append(self._transition(job, S.SCHEDULED, ev.now, reason))
            cmds.append(Assign(p.worker_id, job.job_id, attempt.number, p.gpu_indices))
        for u in result.unplaced:
            job = self.jobs[u.job_id]
            if job.pending_reasons != u.reasons:
                job.pending_reasons = u.reasons
                self._dirty_jobs.add(job.job_id)
        return cmds
