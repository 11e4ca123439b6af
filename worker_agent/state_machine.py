"""The agent's decisions as a pure state machine: events in, instructions out.

Like dask's ``WorkerState``: :class:`AgentState` holds what the agent knows about its
attempts and its lease, :meth:`AgentState.handle` takes one frozen event and returns
the frozen instructions the shell (``agent.py``) must carry out, in order. Nothing here
awaits, reads a clock, opens a socket or touches a file: the time is on the event
(``now``, ``sent_at``: monotonic seconds), and what the shell observed (which GPUs run
a miner) is too. Decisions that only change the state return no instruction. The
reasons written into the instructions are the messages the broker and the job's
events see, so they are constants of this module.

Events and what they decide::

    Registered(sent_at, lease_ttl_s)       the lease starts        -> WriteFence
    HeartbeatAnswered(sent_at)             the lease is renewed    -> WriteFence, and
                                           ResetStream when attempts were stopped or not
                                           started while it was in doubt (a new stream
                                           begins with a Reconcile)
    HeartbeatFailed(now, code, refused)    first failure           -> ResetStream (a
                                           half-open stream would hide the outage); the
                                           fence moves when "refused" changes -> WriteFence
    LeaseCheck(now)                        past Lease.stop_at      -> StopAttempt(report=False)
                                           for every attempt not stopping yet
    Reconcile(assignments, mining_gpus, now)
                                           stop what is not listed -> StopAttempt(report=True);
                                           start what is missing   -> see Assigned
    Assigned(assignment, mining_gpus, now) not finished here, not running, lease good:
                                           a miner on its GPUs     -> StopMiners (then
                                                                      MinersStopped)
                                           rig unhealthy           -> RefuseAttempt
                                           draining                -> nothing
                                           otherwise               -> StartAttempt
    Cancelled(key, reason)                 running -> StopAttempt(report=True); waiting for
                                           miners -> dropped once they are gone
    Stale(key, reason)                     the broker no longer knows it -> StopAttempt
    MinersStopped(key, ok)                 start the waiting attempt (as Assigned), or
                                           DropAttempt when it was cancelled meanwhile
    AttemptStarted(key), AttemptEnded(key) what the AttemptRunner did
    FinishedReported(keys)                 the broker has their ``finished``: never again
    RigUnhealthy(reason)                   refuse new work        -> AskBrokerToDrain(retry)
    DrainRequested()                       accept nothing new     -> AskBrokerToDrain(once)
    DrainGraceOver()                       hand back the rest     -> StopAttempt(report=False)
    GpuFaulted(index, reason, now)         quarantine that GPU    -> StopAttempt(report=False)
                                           of ONLY the attempt on it (the broker requeues
                                           it when it takes the report), ReportGpuHealth
    ProbationDue(now)                      probation over, GPU free -> RunSelfTest(index)
    SelfTestDone(index, passed, ...)       passed: back; failed: another probation
                                                                  -> ReportGpuHealth
    ReinstateAsked(index, by, now)         strikes cleared        -> ReportGpuHealth,
                                                                     RunSelfTest at once

An Assigned or Reconciled attempt whose GPUs include a quarantined one is refused
(RefuseAttempt: a setup failure of the rig's, the broker requeues it). The quarantine
book (``quarantine.py``) holds the reasons, the probation times and the three strikes.

Two queries feed the mining policy and the metrics: :meth:`AgentState.busy_gpus` (the
one definition of a busy GPU: quarantined GPUs count, so no miner runs there) and
:attr:`AgentState.running`. The events and instructions are in ``events.py``.

It logs what it decides on the ``rigshift.agent`` logger (as dask's ``WorkerState``
does); logging is its only side effect.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.events import (
    AskBrokerToDrain,
    Assigned,
    AttemptEnded,
    AttemptStarted,
    Cancelled,
    DrainGraceOver,
    DrainRequested,
    DropAttempt,
    Event,
    FinishedReported,
    GpuFaulted,
    HeartbeatAnswered,
    HeartbeatFailed,
    Instruction,
    LeaseCheck,
    MinersStopped,
    ProbationDue,
    Reconcile,
    RefuseAttempt,
    Registered,
    ReinstateAsked,
    ReportGpuHealth,
    ResetStream,
    RigUnhealthy,
    RunSelfTest,
    SelfTestDone,
    Stale,
    StartAttempt,
    StopAttempt,
    StopMiners,
    WriteFence,
)
from worker_agent.lease import STOP_MARGIN_S, Lease
from worker_agent.outbox import AttemptKey
from worker_agent.quarantine import QuarantineBook

__all__ = [
    "HANDED_BACK",
    "LEASE_LOST",
    "NOT_RECONCILED",
    "AgentState",
    "AskBrokerToDrain",
    "Assigned",
    "AttemptEnded",
    "AttemptStarted",
    "Cancelled",
    "DrainGraceOver",
    "DrainRequested",
    "DropAttempt",
    "Event",
    "FinishedReported",
    "GpuFaulted",
    "HeartbeatAnswered",
    "HeartbeatFailed",
    "Instruction",
    "LeaseCheck",
    "MinersStopped",
    "ProbationDue",
    "Reconcile",
    "RefuseAttempt",
    "Registered",
    "ReinstateAsked",
    "ReportGpuHealth",
    "ResetStream",
    "RigUnhealthy",
    "RunSelfTest",
    "SelfTestDone",
    "Stale",
    "StartAttempt",
    "StopAttempt",
    "StopMiners",
    "WriteFence",
]

log = logging.getLogger("rigshift.agent")

#: Why attempts are stopped when the lease runs out (not reported: the broker requeues).
LEASE_LOST = "lease lost: the broker was unreachable"
#: Why an attempt the broker's Reconcile does not list is stopped.
NOT_RECONCILED = "not in the broker's reconcile"
#: Why the attempts still running when the drain grace is over are stopped (not reported).
HANDED_BACK = "handed back: agent shutting down"
#: How many attempts whose ``finished`` the broker acknowledged are remembered.
REMEMBER_FINISHED = 10_000


# --- the state ------------------------------------------------------------------------


@dataclass(slots=True)
class _Held:
    """An attempt the AttemptRunner holds, from StartAttempt to AttemptEnded."""

    gpus: tuple[int, ...]
    started: bool = False
    stopping: bool = False


def _key(assignment: ws.Assignment) -> AttemptKey:
    return (assignment.job, assignment.attempt)


class AgentState:
    """What the agent knows and decides (see the module docstring). Not thread-safe:
    the agent's event loop is its only caller."""

    def __init__(self, lease: Lease, quarantine: QuarantineBook | None = None) -> None:
        self.lease = lease
        self.quarantine = quarantine or QuarantineBook()
        """The GPUs out of service (``quarantine.py``)."""
        """The lease as the agent sees it (``lease.py``)."""
        self.running: dict[AttemptKey, _Held] = {}
        """Attempts the AttemptRunner holds (setting up, running or stopping)."""
        self.waiting: dict[AttemptKey, ws.Assignment] = {}
        """Assignments waiting for the miners on their GPUs to stop."""
        self.drop_reasons: dict[AttemptKey, str] = {}
        """Why a waiting assignment is dropped instead of started."""
        self.reported_finished: OrderedDict[AttemptKey, None] = OrderedDict()
        """Attempts whose ``finished`` the broker has: never started again (the newest)."""
        self.fenced: set[AttemptKey] = set()
        """Attempts stopped because the lease ran out."""
        self.resync = False
        """Ask the broker again what this rig runs once a heartbeat is answered."""
        self.accepting = True
        """False once draining: no new attempt starts."""
        self.unhealthy = ""
        """Why the rig takes no more work; "" while healthy."""
        self._handlers: dict[type, Callable[[Any], list[Instruction]]] = {
            Registered: self._registered,
            HeartbeatAnswered: self._heartbeat_answered,
            HeartbeatFailed: self._heartbeat_failed,
            LeaseCheck: self._lease_check,
            Reconcile: self._reconcile,
            Assigned: self._assigned,
            Cancelled: self._cancelled,
            Stale: self._stale,
            MinersStopped: self._miners_stopped,
            AttemptStarted: self._attempt_started,
            AttemptEnded: self._attempt_ended,
            FinishedReported: self._finished_reported,
            RigUnhealthy: self._rig_unhealthy,
            DrainRequested: self._drain_requested,
            DrainGraceOver: self._drain_grace_over,
            GpuFaulted: self._gpu_faulted,
            ProbationDue: self._probation_due,
            SelfTestDone: self._selftest_done,
            ReinstateAsked: self._reinstate_asked,
        }

    def handle(self, event: Event) -> list[Instruction]:
        """Apply one event; the instructions to carry out, in order."""
        return self._handlers[type(event)](event)

    # --- queries ----------------------------------------------------------------------

    def busy_gpus(self, *, started: bool = False) -> set[int]:
        """GPUs held by an attempt (from its assignment until it ended, stopping included)
        or by an assignment waiting for a miner to stop, and quarantined GPUs: no miner
        starts there. With ``started``: only the GPUs of attempts whose process has
        started (they do AI work)."""
        busy = self._held_gpus(started=started)
        if not started:
            busy.update(self.quarantine.quarantined())
        return busy

    def _held_gpus(self, *, started: bool = False) -> set[int]:
        busy: set[int] = set()
        for held in self.running.values():
            if held.started or not started:
                busy.update(held.gpus)
        if not started:
            for assignment in self.waiting.values():
                busy.update(assignment.gpu_indices)
        return busy

    # --- lease ------------------------------------------------------------------------

    def _registered(self, e: Registered) -> list[Instruction]:
        lease = self.lease
        lease.ttl_s = e.lease_ttl_s
        lease.renewed(e.sent_at)
        if lease.lead_s < lease.stop_lead_s:
            log.warning(
                "the broker's lease TTL of %.0f s leaves %.1f s to stop jobs when it is "
                "unreachable, under cancel_grace_s + %.1f s: a job may briefly run twice",
                lease.ttl_s,
                lease.lead_s,
                STOP_MARGIN_S,
            )
        return [WriteFence()]

    def _heartbeat_answered(self, e: HeartbeatAnswered) -> list[Instruction]:
        outage = self.lease.renewed(e.sent_at)
        out: list[Instruction] = [WriteFence()]
        if outage is not None:
            log.info("broker reachable again (no heartbeat answered for %.1f s)", outage)
        if self.resync and not self.fenced.intersection(self.running):
            # Attempts were stopped or not started while the lease was in doubt: ask the
            # broker again what this rig runs (a new stream begins with a Reconcile).
            self.resync = False
            self.fenced.clear()
            out.append(ResetStream("the lease is renewed: reconcile"))
        return out

    def _heartbeat_failed(self, e: HeartbeatFailed) -> list[Instruction]:
        lease = self.lease
        was_down = lease.broker_down
        first = lease.failed(e.now, refused=e.refused)
        out: list[Instruction] = []
        if e.refused != was_down:
            out.append(WriteFence())  # a refusing broker (not running) extends it by the grace
        if first:
            log.warning(
                "broker unreachable (heartbeat %s%s): %d attempt(s) keep running, until %.1f s "
                "from now unless it answers",
                e.code,
                ": connection refused" if e.refused else "",
                len(self.running),
                lease.stop_at - e.now,
            )
            # A half-open stream would hide the outage until keepalive finds it.
            out.append(ResetStream(f"heartbeat {e.code}"))
        elif e.refused != was_down:
            log.warning(
                "broker %s: attempts are stopped %.1f s from now unless it answers",
                "refuses connections (not running)" if e.refused else "unreachable again",
                lease.stop_at - e.now,
            )
        return out

    def _lease_check(self, e: LeaseCheck) -> list[Instruction]:
        lease = self.lease
        if not lease.must_stop(e.now):
            return []
        keys = [key for key, held in self.running.items() if not held.stopping]
        if not keys:
            return []
        log.warning(
            "no heartbeat answered for %.1f s (lease TTL %.0f s): stopping %d attempt(s) %s",
            e.now - lease.renewed_at,
            lease.ttl_s,
            len(keys),
            "after the lease grace (the broker refuses connections)"
            if lease.broker_down
            else "before the broker may requeue them",
        )
        self.fenced.update(keys)
        self.resync = True
        return self._stop(keys, LEASE_LOST, report=False)

    # --- the broker's instructions ----------------------------------------------------

    def _reconcile(self, e: Reconcile) -> list[Instruction]:
        wanted = {_key(a): a for a in e.assignments}
        out = self._stop([k for k in self.running if k not in wanted], NOT_RECONCILED, report=True)
        for key in self.waiting:
            if key not in wanted:
                self.drop_reasons[key] = NOT_RECONCILED
        for key, assignment in wanted.items():
            if key not in self.running and key not in self.reported_finished:
                out += self._start(assignment, e.mining_gpus, e.now)
        log.info("reconciled: %d attempt(s) to run", len(wanted))
        return out

    def _assigned(self, e: Assigned) -> list[Instruction]:
        if _key(e.assignment) in self.reported_finished:
            return []
        return self._start(e.assignment, e.mining_gpus, e.now)

    def _cancelled(self, e: Cancelled) -> list[Instruction]:
        if e.key in self.waiting:
            self.drop_reasons[e.key] = f"cancelled: {e.reason}"
            return []
        return self._stop([e.key], f"cancelled: {e.reason}", report=True)

    def _stale(self, e: Stale) -> list[Instruction]:
        return self._stop([e.key], f"stale: {e.reason}", report=True)

    def _start(
        self, assignment: ws.Assignment, mining_gpus: frozenset[int], now: float
    ) -> list[Instruction]:
        """Start an attempt, after stopping the miners on its GPUs when any run there."""
        key = _key(assignment)
        if key in self.running or key in self.waiting:
            return []
        refused = self._refuse_quarantined(assignment)
        if refused:
            return refused
        if self.lease.must_stop(now):
            # It would be stopped at once; the broker is asked again once it answers.
            log.info("%s attempt %d not started: no heartbeat answered lately", *key)
            self.resync = True
            return []
        if self.accepting and mining_gpus.intersection(assignment.gpu_indices):
            self.waiting[key] = assignment  # its GPUs count as busy: no miner starts there
            self.drop_reasons.pop(key, None)
            return [StopMiners(assignment)]
        return self._launch(assignment)

    def _launch(self, assignment: ws.Assignment) -> list[Instruction]:
        key = _key(assignment)
        if key in self.running:
            return []
        if self.unhealthy:
            return [RefuseAttempt(key, f"rig unhealthy, takes no work: {self.unhealthy}")]
        refused = self._refuse_quarantined(assignment)
        if refused:
            return refused
        if not self.accepting:
            log.info("draining: not starting %s attempt %d", *key)
            return []
        self.running[key] = _Held(tuple(assignment.gpu_indices))
        return [StartAttempt(assignment)]

    def _stop(self, keys: Iterable[AttemptKey], reason: str, *, report: bool) -> list[Instruction]:
        """Stop those of ``keys`` that run here and are not stopping yet."""
        out: list[Instruction] = []
        for key in keys:
            held = self.running.get(key)
            if held is not None and not held.stopping:
                held.stopping = True
                out.append(StopAttempt(key, reason, report))
        return out

    # --- what the shell observed ------------------------------------------------------

    def _miners_stopped(self, e: MinersStopped) -> list[Instruction]:
        assignment = self.waiting.pop(e.key, None)
        reason = self.drop_reasons.pop(e.key, None)
        if assignment is None or not e.ok:
            return []
        if reason is None:
            return self._launch(assignment)
        # Stopped before it started: said like a cancelled attempt (no energy: it held
        # the GPUs only while the miners stopped, and that was mining).
        log.info("%s attempt %d dropped before it started: %s", e.key[0], e.key[1], reason)
        return [DropAttempt(e.key, reason)]

    def _attempt_started(self, e: AttemptStarted) -> list[Instruction]:
        held = self.running.get(e.key)
        if held is not None:
            held.started = True
        return []

    def _attempt_ended(self, e: AttemptEnded) -> list[Instruction]:
        self.running.pop(e.key, None)
        return []

    def _finished_reported(self, e: FinishedReported) -> list[Instruction]:
        for key in e.keys:
            self.reported_finished[key] = None
        while len(self.reported_finished) > REMEMBER_FINISHED:
            self.reported_finished.popitem(last=False)
        return []

    def _rig_unhealthy(self, e: RigUnhealthy) -> list[Instruction]:
        if self.unhealthy:
            return []
        self.unhealthy = e.reason
        return [AskBrokerToDrain(e.reason, until_taken=True)]

    # --- GPU health -------------------------------------------------------------------

    def _refuse_quarantined(self, assignment: ws.Assignment) -> list[Instruction]:
        """RefuseAttempt when the assignment holds a quarantined GPU, else nothing."""
        out = sorted(self.quarantine.quarantined().intersection(assignment.gpu_indices))
        if not out:
            return []
        why = "; ".join(f"GPU {i} quarantined: {self.quarantine.reason(i)}" for i in out)
        return [RefuseAttempt(_key(assignment), why)]

    def _gpu_faulted(self, e: GpuFaulted) -> list[Instruction]:
        if not self.quarantine.fault(e.index, e.reason, e.now, e.wall):
            return []
        keys = [key for key, held in self.running.items() if e.index in held.gpus]
        why = f"GPU {e.index} quarantined: {e.reason}"
        # An assignment still waiting for a miner there is refused once the miner is gone
        # (``_launch``): a setup failure of the rig's, which the broker requeues.
        locked = self.quarantine.out[e.index].reinstate_required
        log.warning(
            "GPU %d quarantined (%s); stopping %d attempt(s) on it%s",
            e.index,
            e.reason,
            len(keys),
            ": three strikes, out until the operator reinstates it" if locked else "",
        )
        return [*self._stop(keys, why, report=False), ReportGpuHealth()]

    def _probation_due(self, e: ProbationDue) -> list[Instruction]:
        # Never a self-test on a GPU an attempt still holds (e.g. one still stopping).
        due = self.quarantine.due(e.now, self._held_gpus())
        return [RunSelfTest(i) for i in due]

    def _selftest_done(self, e: SelfTestDone) -> list[Instruction]:
        if not self.quarantine.tested(e.index, e.passed, e.reason, e.measurement, e.now):
            return []
        if e.passed:
            log.info("GPU %d passed its probation self-test: back in service", e.index)
        else:
            log.warning("GPU %d failed its probation self-test (%s): stays out", e.index, e.reason)
        return [ReportGpuHealth()]

    def _reinstate_asked(self, e: ReinstateAsked) -> list[Instruction]:
        log.info("GPU %d reinstated by %s: re-testing it", e.index, e.by or "the operator")
        if not self.quarantine.reinstate(e.index, e.now):
            return []
        return [ReportGpuHealth(), *self._probation_due(ProbationDue(e.now))]

    # --- drain ------------------------------------------------------------------------

    def _drain_requested(self, e: DrainRequested) -> list[Instruction]:
        if not self.accepting:
            return []
        self.accepting = False
        log.info("draining: accepting no new work, %d attempt(s) running", len(self.running))
        return [AskBrokerToDrain()]

    def _drain_grace_over(self, e: DrainGraceOver) -> list[Instruction]:
        return self._stop(list(self.running), HANDED_BACK, report=False)
