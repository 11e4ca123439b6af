"""The broker's pure core: a state machine over jobs, attempts and workers (STYLE.md 1).

**Events in, commands out.** ``BrokerCore.handle(event) -> list[Command]`` is the only
way state changes and the only way anything leaves: the decisions (job and worker
transitions, assignments with everything the agent needs, cancellations, log lines),
then the ledger entries to write (``PostLedger``), the jobs and workers to write
(``Persist``, by id: the store reads those records through :meth:`BrokerCore.job` and
:meth:`BrokerCore.worker`) and whether a scheduling pass is wanted (``RequestSchedule``);
``broker.events`` has the list. No clock, socket, database or ``await`` in here:
``now`` comes on the event. The shell (``broker.service``) writes what the commands
name, then carries out the rest.

**Restore.** A restarted broker rebuilds its core with :meth:`BrokerCore.restore` from
the records the store read (``StoredState``); the core rebuilds its queue, caches and
indexes there, so every other method can rely on them.

**Forgetting.** After the store committed a batch the shell sends ``JobsStored``: the
finished jobs without a live attempt leave the core (``broker.forget``); memory follows
live work, and reads of the others come from the store (docs/scale.md section 1).

**Reads** (``job``, ``worker``, ``live_attempts``, ``assignments``, ``reliability``,
``quote``, ``snapshot``, and the records in ``jobs``, ``workers``, ``farms``,
``ledger``) change nothing.

Job lifecycle (PRODUCT.md, AIP-216)::

    PENDING ──place──▶ SCHEDULED ──started──▶ RUNNING ──exit 0──▶ SUCCEEDED
       ▲                  │  │                  │  │──exit≠0──▶ FAILED
       └──lease lost──────┘  │                  │  └──lease lost, no attempts left──▶ FAILED
       (attempts left)       └──────cancel──────┴──────────────────▶ CANCELLED

``TRANSITIONS`` is the table; anything else raises ``InvalidTransition``.

The state records are ``broker.records``; settlement and SLA credits
``broker.settlement``; the queue and capacity caches ``broker.queue``; placement and
the preemption plan ``broker.scheduler``; the handlers of workers ``broker.workers``, of
agent reports ``broker.reports`` and of GPU health and verification ``broker.gpu_health``.
"""

from __future__ import annotations

from collections.abc import Iterable

from broker.curtailment import Curtailments
from broker.economics import FarmTerms, LedgerEntry
from broker.errors import FailedPrecondition, InvalidTransition, NotFound
from broker.events import (
    Assign,
    AttemptReport,
    Cancel,
    CancelRequested,
    Command,
    CurtailmentCancelled,
    CurtailmentScheduled,
    DrainRequested,
    Event,
    FarmConfigured,
    GpuHealthReported,
    Heartbeat,
    JobsStored,
    JobSubmitted,
    Persist,
    PostLedger,
    ReinstateRequested,
    RequestSchedule,
    SchedulePass,
    Tick,
    Transition,
    WorkerRegistered,
)
from broker.forget import finished, forget_finished
from broker.gpu_health import GpuHealthHandlers
from broker.model import (
    TERMINAL_JOB_STATES,
    AttemptState,
    JobSpec,
    JobState,
    Tier,
    WorkerState,
)
from broker.parking import ParkingQueue, may_wait
from broker.policy import FIFO, Fifo, ShortFirst
from broker.queue import Capacities, SchedulingView, job_request, priority
from broker.quotes import spot_prices
from broker.records import (
    Attempt,
    AttemptOutput,
    Effects,
    Gpu,
    HistoryEntry,
    Job,
    Quote,
    SlaEvent,
    StoredState,
    Worker,
    record_outcome,
    reliability,
)
from broker.reports import Reports
from broker.scheduler import (
    PreemptionCandidate,
    PreemptionPlan,
    Snapshot,
    Unplaced,
    Victim,
    preemption_plan,
)
from broker.settlement import (
    credit_legs,
    floor_of,
    interruption,
    lost_work,
    price_for,
    settlement,
    start_deadline_missed,
)
from broker.windows import DEFAULT_LEAD_S, need_seconds
from broker.workers import Workers

__all__ = [
    "TRANSITIONS",
    "Attempt",
    "AttemptOutput",
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


class BrokerCore(Workers, Reports, GpuHealthHandlers, Curtailments):
    """All broker decisions. Feed events to :meth:`handle`; read through the public reads."""

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
        view: SchedulingView | None = None,
        curtailment_lead_s: float = DEFAULT_LEAD_S,
        keep_ledger: bool = True,
    ) -> None:
        """``view`` decides what each scheduling pass places (``broker.queue``); the
        default keeps the queue sorted and places on the core's kept index.
        ``curtailment_lead_s``: how long before a curtailment window a job without a
        declared duration stops being placed on that farm (``broker.curtailment``).
        ``keep_ledger=False`` (the broker's): ``PostLedger`` is emitted as always but
        nothing is kept in ``ledger`` (the store holds it; docs/scale.md)."""
        self.keep_ledger = keep_ledger
        self.lease_ttl_s = lease_ttl_s
        self.default_max_attempts = default_max_attempts
        self.spot_permille = spot_permille
        self.start_deadline_s = start_deadline_s
        self.reliability_window_s = reliability_window_s
        self.default_fee_permille = default_fee_permille
        self.queue_policy = queue_policy
        self.view: SchedulingView = view if view is not None else ParkingQueue()
        self.farms: dict[str, FarmTerms] = {}
        self.ledger: list[LedgerEntry] = []  # every entry posted, in order
        self.jobs: dict[str, Job] = {}
        self.workers: dict[str, Worker] = {}
        self.pending: dict[str, None] = {}  # ordered set of PENDING job ids
        self.requests: dict[tuple[str, str], str] = {}  # (owner, request_id) -> job_id
        self._caps = Capacities()  # what the scheduler sees of the ONLINE workers
        self._spot_live: dict[str, int] = {}  # worker -> live spot attempts on it
        self._out = Effects()
        self._init_curtailments(curtailment_lead_s)

    # --- the contract -------------------------------------------------------------

    def handle(self, event: Event) -> list[Command]:
        """Apply one event and return the commands it causes, in order."""
        match event:
            case JobSubmitted():
                cmds = self._submit(event)
            case CancelRequested():
                cmds = self._cancel(event)
            case WorkerRegistered():
                cmds = self._register(event)
            case Heartbeat():
                cmds = self._heartbeat(event)
            case DrainRequested():
                cmds = self._drain(event)
            case Tick():
                cmds = self._tick(event) + self._curtail_tick(event.now)
            case SchedulePass():
                cmds = self._schedule(event)
            case FarmConfigured():
                cmds = self._configure_farm(event)
            case AttemptReport():
                cmds = self._report(event)
            case GpuHealthReported():
                cmds = self._gpu_health(event)
            case ReinstateRequested():
                cmds = self._reinstate(event)
            case CurtailmentScheduled():
                cmds = self._curtailment_scheduled(event)
            case CurtailmentCancelled():
                cmds = self._curtailment_cancelled(event)
            case JobsStored():
                cmds = forget_finished(self.jobs, self.requests, event.job_ids)
            case _:
                raise TypeError(f"unknown event {event!r}")
        out = self._out
        if out.workers:
            self._refresh(out.workers, event.now)
        if out.jobs or out.workers or out.ledger or out.schedule:
            if out.ledger:
                cmds.append(PostLedger(tuple(out.ledger)))
            if out.jobs or out.workers:
                cmds.append(Persist(frozenset(out.jobs), frozenset(out.workers)))
            if out.schedule:
                cmds.append(RequestSchedule())
            self._out = Effects()
        return cmds

    def restore(self, state: StoredState, now: float) -> None:
        """Rebuild an empty core from the store's records; every worker gets a fresh lease
        (a grace period to reconnect). The records become the core's own."""
        if self.jobs or self.workers or self.farms or self.ledger or self.windows:
            raise ValueError("restore() needs a core that has handled nothing")
        self.farms = {terms.farm_id: terms for terms in state.farms}
        self._restore_curtailments(state.curtailments, now)
        self.ledger = list(state.ledger)
        for worker in state.workers:
            worker.lease_expires_at = now + self.lease_ttl_s
            self.workers[worker.worker_id] = worker
        queued = []
        for job in state.jobs:
            self.jobs[job.job_id] = job
            if job.request_id:
                self.requests[(job.owner, job.request_id)] = job.job_id
            if job.state == S.PENDING:
                queued.append((priority(job, self.queue_policy), job))
        queued.sort(key=lambda entry: entry[0])  # in order: each insert lands at the end
        for key, job in queued:
            self.pending[job.job_id] = None
            self.view.job_queued(
                job.job_id, key, job_request(job.job_id, job.spec, self.spot_permille)
            )
        for worker in self.workers.values():
            for job, _ in self._held_attempts(worker):
                if job.spec.tier == Tier.SPOT:
                    self._spot_live[worker.worker_id] = self._spot_live.get(worker.worker_id, 0) + 1
        self._refresh(self.workers, now)

    # --- reads ----------------------------------------------------------------------

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

    def is_duplicate(self, report: AttemptReport) -> bool:
        """True when this (job, attempt, sequence) was applied already."""
        job = self.jobs.get(report.job_id)
        if job is None or not 1 <= report.attempt <= len(job.attempts):
            return False
        return report.sequence <= job.attempts[report.attempt - 1].last_sequence

    def live_attempts(self, worker_id: str) -> list[tuple[Job, Attempt]]:
        """Attempts this worker should be running now (a cancelled job's are excluded)."""
        held = self._held_attempts(self.worker(worker_id))
        return [(job, a) for job, a in held if job.state not in TERMINAL_JOB_STATES]

    def assignments(self, worker_id: str) -> tuple[Assign, ...]:
        """What this worker should be running now, as the ``Assign`` commands that started
        it (with the job's latest checkpoint): the Reconcile of a stream that opens."""
        return tuple(_assign(job, a) for job, a in self.live_attempts(worker_id))

    def reliability(self, worker: Worker, now: float) -> int:
        """Reliability of a worker over the recent window, in thousandths (pure)."""
        return reliability(worker, now, self.reliability_window_s)

    def floor_of(self, worker: Worker, index: int) -> int:
        """Floor price per GPU-hour of one GPU (0 when its farm set no terms)."""
        return floor_of(self.farms.get(worker.farm_id), worker, index)

    def quote(self, spec: JobSpec) -> Quote:
        """What a job of ``spec`` would find now (QuoteJob), from the kept fleet index and
        the same filters as a placement: the GPUs that pass them, what it would pay on
        them, and whether a pass now would place it (or why not)."""
        request = job_request("quote", spec, self.spot_permille)
        fleet = self._caps.fleet
        probe = fleet.probe(request)
        groups = fleet.matching(request)
        prices = [g.price_micros_per_gpu_hour for g in groups]
        if spec.tier == Tier.SPOT:  # each GPU's discount stops at its farm's floor
            prices = spot_prices(self._caps, groups, self.spot_permille)
        return Quote(
            matching_gpus=sum(g.gpus for g in groups),
            free_matching_gpus=sum(g.free_gpus for g in groups),
            min_price_micros_per_gpu_hour=min(prices, default=0),
            max_price_micros_per_gpu_hour=max(prices, default=0),
            placeable_now=bool(probe.placements),
            reasons=probe.unplaced[0].reasons if probe.unplaced else (),
            groups=groups[:50],
        )

    def snapshot(self, now: float) -> Snapshot:
        """The frozen view a scheduling pass of the default view places: PENDING jobs in
        ``queue_policy`` order (guaranteed before spot), ONLINE workers. Built per call
        (tests, debugging); a pass itself places on the kept index."""
        order = sorted(self.pending, key=lambda j: priority(self.jobs[j], self.queue_policy))
        pending = tuple(job_request(j, self.jobs[j].spec, self.spot_permille) for j in order)
        caps = self._caps.of
        workers = tuple(caps[w] for w in self.workers if w in caps)
        return Snapshot(now=now, pending=pending, workers=workers)

    # --- jobs -----------------------------------------------------------------------

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
        self._queue(job)
        self._out.jobs.add(job.job_id)
        return [Transition(job.job_id, None, S.PENDING, "submitted")]

    def _queue(self, job: Job) -> None:
        self.pending[job.job_id] = None
        request = job_request(job.job_id, job.spec, self.spot_permille)
        self.view.job_queued(job.job_id, priority(job, self.queue_policy), request)
        self._out.schedule = True

    def _transition(self, job: Job, to: JobState, now: float, reason: str) -> Transition:
        if to not in TRANSITIONS[job.state]:
            history = [f"{h.from_state}->{h.to_state} ({h.reason})" for h in job.history]
            raise InvalidTransition(job.job_id, job.state, to, history)
        cmd = Transition(job.job_id, job.state, to, reason)
        if job.state == S.PENDING:
            del self.pending[job.job_id]
            self.view.job_dequeued(job.job_id)
        job.history.append(HistoryEntry(now, job.state, to, reason))
        job.state = to
        job.update_time = now
        if to == S.PENDING:
            self._queue(job)
        if to in TERMINAL_JOB_STATES or to == S.SCHEDULED:
            job.pending_reasons = ()
        if to in TERMINAL_JOB_STATES:
            job.status_message = reason
        self._out.jobs.add(job.job_id)
        return cmd

    def _cancel(self, ev: CancelRequested) -> list[Command]:
        job = self.job(ev.job_id)
        if job.state == S.CANCELLED:
            return []
        if job.state in TERMINAL_JOB_STATES:
            raise finished(job)
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

    def _worker_changed(self, worker_id: str) -> None:
        """Everything that changes what the scheduler would see of a worker (GPUs held or
        freed, state, prices, reliability history) calls this: the store writes the worker,
        and the capacity caches take it up again at the end of the event."""
        self._out.workers[worker_id] = None

    def _refresh(self, worker_ids: Iterable[str], now: float) -> None:
        """Bring the capacity caches and the view up to date with these workers."""
        caps, view = self._caps, self.view
        for worker_id in worker_ids:
            worker = self.workers.get(worker_id)
            if worker is not None and worker.state == WorkerState.ONLINE:
                take, index = self._curtail_index(worker.farm_id, now)
                if take:
                    cap = caps.update(worker, self.reliability(worker, now), index, self.floor_of)
                    # A farm with a window coming is placed on by the core only.
                    view.worker_changed(worker_id, cap if index is None else None)
                    continue
            caps.remove(worker_id)
            view.worker_changed(worker_id, None)

    # --- attempts ending: settlement and SLA credits ----------------------------------

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
        self._sla(job, interruption(attempt, why, now))
        lost = lost_work(job, attempt, now)
        if lost is not None:
            self._sla(job, lost)

    def _sla(self, job: Job, event: SlaEvent) -> None:
        job.sla_events.append(event)
        self._out.jobs.add(job.job_id)
        if event.credit_micros > 0:
            job.credit_micros += event.credit_micros
            self._post(credit_legs(job, event, len(job.sla_events)))

    def _post(self, entries: list[LedgerEntry]) -> None:
        if sum(e.amount_micros for e in entries) != 0:
            raise AssertionError(f"unbalanced transaction {entries[0].txn}")
        if self.keep_ledger:
            self.ledger.extend(entries)
        self._out.ledger.extend(entries)

    def _end_attempt(
        self, attempt: Attempt, state: AttemptState, now: float, msg: str, rig_fault: bool = False
    ) -> None:
        worker = self.workers[attempt.worker_id]
        job = self.jobs[attempt.job_id]
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
            ok = state != AttemptState.LOST and not rig_fault
            record_outcome(worker, now, ok, self.reliability_window_s)
        if job.spec.tier == Tier.SPOT:
            left = self._spot_live[worker.worker_id] - 1
            if left:
                self._spot_live[worker.worker_id] = left
            else:
                del self._spot_live[worker.worker_id]
        self._settle(job, attempt, now)
        self._worker_changed(worker.worker_id)
        self._out.jobs.add(attempt.job_id)
        self._out.schedule = True

    def _settle(self, job: Job, attempt: Attempt, now: float) -> None:
        """Charge the client for the GPU time the attempt ran; exactly once per attempt."""
        if attempt.settled:
            raise AssertionError(f"attempt {job.job_id}#{attempt.number} settled twice")
        farm_id = self.workers[attempt.worker_id].farm_id
        terms = self.farms.get(farm_id)
        fee = terms.broker_fee_permille if terms else self.default_fee_permille
        charge, legs = settlement(job, attempt, farm_id, fee, now)
        self._post(legs)
        attempt.charge_micros = charge
        attempt.settled = True

    # --- scheduling -------------------------------------------------------------------

    def _schedule(self, ev: SchedulePass) -> list[Command]:
        if not self.pending:
            return []
        fleet = self._caps.fleet
        parking = self.view if isinstance(self.view, ParkingQueue) else None
        if parking is None:
            result = self.view.place(fleet, ev.now)
        else:  # only the jobs a change may have helped (broker.parking)
            freed, reshaped = fleet.drain_changes()
            result = fleet.place(parking.examine(fleet, freed, reshaped, bool(self._by_farm)))
        cmds: list[Command] = []
        for p in result.placements:
            job = self.jobs[p.job_id]
            cmds += self._bind(job, p.worker_id, p.gpu_indices, p.price_micros_per_gpu_hour, ev.now)
        unplaced = result.unplaced
        if parking is not None and self._spot_live:
            # Parked guaranteed jobs try the preemption step every pass, in queue order.
            more = [Unplaced(j, self.jobs[j].pending_reasons) for j in parking.preemptible()]
            if more:
                unplaced = tuple(sorted((*unplaced, *more), key=lambda u: parking.key(u.job_id)))
        for u in unplaced:
            job = self.jobs[u.job_id]
            if self._side and job.state == S.PENDING:
                placed = self._place_before_windows(job, ev.now)
                if placed:
                    cmds += placed
                    continue
            reason = u.reasons[0] if u.reasons else None
            if (
                self._spot_live  # else nothing could be preempted
                and job.spec.tier == Tier.GUARANTEED
                and may_wait(reason)
            ):
                request = job_request(job.job_id, job.spec, self.spot_permille)
                plan = preemption_plan(request, self._preemption_candidates(job, ev.now))
                if isinstance(plan, PreemptionPlan):
                    for victim in plan.victims:
                        vjob = self.jobs[victim.job_id]
                        cmds += self._preempt(vjob, vjob.attempts[victim.attempt - 1], job, ev.now)
                    ask = plan.price_micros_per_gpu_hour
                    cmds += self._bind(job, plan.worker_id, plan.gpu_indices, ask, ev.now)
                    continue
            reasons = u.reasons + self._curtail_reasons(job, ev.now)
            if job.pending_reasons != reasons:
                job.pending_reasons = reasons
                self._out.jobs.add(job.job_id)
            if parking is not None:
                guaranteed = job.spec.tier == Tier.GUARANTEED
                parking.park(job.job_id, reason, guaranteed and may_wait(reason))
        return cmds

    def _bind(
        self, job: Job, worker_id: str, indices: tuple[int, ...], ask: int, now: float
    ) -> list[Command]:
        """The only step of scheduling that writes: hold the GPUs, open an attempt."""
        worker = self.workers[worker_id]
        price = price_for(job.spec.tier, ask, self.floor_of(worker, indices[0]), self.spot_permille)
        late = start_deadline_missed(job, len(indices), price, self.start_deadline_s, now)
        if late is not None:
            self._sla(job, late)
        attempt = Attempt(job.job_id, len(job.attempts) + 1, worker_id, indices, price, now)
        # One power limit per attempt: its first GPU's AI limit (a gang is one model).
        attempt.power_limit_watts = worker.gpus[indices[0]].ai_power_limit_watts
        job.attempts.append(attempt)
        for index in indices:
            worker.gpus[index].holder = (job.job_id, attempt.number)
        if job.spec.tier == Tier.SPOT:
            self._spot_live[worker_id] = self._spot_live.get(worker_id, 0) + 1
        self._worker_changed(worker_id)
        gpus = ",".join(map(str, indices))
        reason = f"placed on {worker_id} GPUs {gpus} (attempt {attempt.number})"
        return [self._transition(job, S.SCHEDULED, now, reason), _assign(job, attempt)]

    def _preemption_candidates(self, job: Job, now: float) -> list[PreemptionCandidate]:
        """The ONLINE workers running spot attempts that may be preempted (SCHEDULED or
        RUNNING), as they are now, on farms whose curtailment windows leave ``job`` room.
        Only those can offer a victim, so only those are read: nothing at all while no
        spot job runs."""
        out = []
        need = need_seconds(job.spec, self.curtailment_lead_s)
        for worker_id in self._spot_live:
            worker = self.workers[worker_id]
            if worker.state != WorkerState.ONLINE:
                continue
            if self._by_farm and not self._farm_open_for(worker.farm_id, need, now):
                continue
            victims = tuple(
                Victim(job.job_id, a.number, a.gpu_indices, a.schedule_time)
                for job, a in self._held_attempts(worker)
                if job.spec.tier == Tier.SPOT and job.state in (S.SCHEDULED, S.RUNNING)
            )
            capacity = self._caps.capacity(worker)
            out.append(PreemptionCandidate(capacity, victims))
        return out

    def _preempt(self, victim: Job, attempt: Attempt, by: Job, now: float) -> list[Command]:
        why = f"preempted by guaranteed job {by.job_id}"
        self._end_attempt(attempt, AttemptState.PREEMPTED, now, why)
        self._interrupted(victim, attempt, now, why)
        return [
            self._transition(victim, S.PENDING, now, why),
            Cancel(attempt.worker_id, victim.job_id, attempt.number, why),
        ]


def _assign(job: Job, attempt: Attempt) -> Assign:
    """The command that starts (or, in a Reconcile, continues) an attempt."""
    return Assign(
        attempt.worker_id,
        job.job_id,
        attempt.number,
        attempt.gpu_indices,
        job.spec,
        attempt.price_micros_per_gpu_hour,
        job.checkpoint_sha256,
        attempt.power_limit_watts,
    )
