"""The agent state machine's vocabulary: the events it takes and the instructions it gives.

Frozen dataclasses only (``state_machine.py`` decides, ``agent.py`` carries out); the
state machine re-exports every name, so ``state_machine.StartAttempt`` still works.
"""

from __future__ import annotations

from dataclasses import dataclass

from rigshift.scoring import Measurement
from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.outbox import AttemptKey

__all__ = [
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

# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registered:
    """RegisterWorker, sent at ``sent_at``, was answered with this lease TTL."""

    sent_at: float
    lease_ttl_s: float


@dataclass(frozen=True, slots=True)
class HeartbeatAnswered:
    """A heartbeat sent at ``sent_at`` was answered."""

    sent_at: float


@dataclass(frozen=True, slots=True)
class HeartbeatFailed:
    """A heartbeat failed at ``now`` with status ``code`` (its name); ``refused``: the
    broker's port refused the connection (no broker process listens)."""

    now: float
    code: str
    refused: bool = False


@dataclass(frozen=True, slots=True)
class LeaseCheck:
    """Time passed: stop the attempts if the lease is about to run out."""

    now: float


@dataclass(frozen=True, slots=True)
class Reconcile:
    """The first message of an instruction stream: what the broker says this rig runs.
    ``mining_gpus``: the GPUs a miner holds now (running or stopping)."""

    assignments: tuple[ws.Assignment, ...]
    mining_gpus: frozenset[int]
    now: float


@dataclass(frozen=True, slots=True)
class Assigned:
    """The broker placed an attempt here. ``mining_gpus`` as in :class:`Reconcile`."""

    assignment: ws.Assignment
    mining_gpus: frozenset[int]
    now: float


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The broker cancelled an attempt (the client cancelled the job, or it was preempted)."""

    key: AttemptKey
    reason: str


@dataclass(frozen=True, slots=True)
class Stale:
    """The broker answered a report saying the attempt is no longer this rig's."""

    key: AttemptKey
    reason: str


@dataclass(frozen=True, slots=True)
class MinersStopped:
    """The miners on a waiting attempt's GPUs are gone (``ok``), or stopping them failed."""

    key: AttemptKey
    ok: bool = True


@dataclass(frozen=True, slots=True)
class AttemptStarted:
    """The attempt's process started."""

    key: AttemptKey


@dataclass(frozen=True, slots=True)
class AttemptEnded:
    """The AttemptRunner is done with the attempt (reported or handed back)."""

    key: AttemptKey


@dataclass(frozen=True, slots=True)
class FinishedReported:
    """The broker acknowledged the ``finished`` events of these attempts."""

    keys: tuple[AttemptKey, ...]


@dataclass(frozen=True, slots=True)
class RigUnhealthy:
    """The rig can take no work (its state directory's disk is full)."""

    reason: str


@dataclass(frozen=True, slots=True)
class DrainRequested:
    """Shutdown was requested: accept nothing new."""


@dataclass(frozen=True, slots=True)
class DrainGraceOver:
    """The drain grace is over (or was cut short): hand back what still runs."""


@dataclass(frozen=True, slots=True)
class GpuFaulted:
    """A critical health verdict on GPU ``index`` at ``now`` (monotonic); ``wall``: the
    same moment in Unix seconds (what the report says)."""

    index: int
    reason: str
    now: float
    wall: float = 0.0


@dataclass(frozen=True, slots=True)
class ProbationDue:
    """Time passed: re-test the quarantined GPUs whose probation is over."""

    now: float


@dataclass(frozen=True, slots=True)
class SelfTestDone:
    """A probation self-test of GPU ``index`` ended: ``passed`` or not, and why."""

    index: int
    passed: bool
    reason: str
    measurement: Measurement | None
    now: float


@dataclass(frozen=True, slots=True)
class ReinstateAsked:
    """The operator reinstated GPU ``index`` (the stream's Reinstate instruction)."""

    index: int
    by: str
    now: float


Event = (
    Registered
    | HeartbeatAnswered
    | HeartbeatFailed
    | LeaseCheck
    | Reconcile
    | Assigned
    | Cancelled
    | Stale
    | MinersStopped
    | AttemptStarted
    | AttemptEnded
    | FinishedReported
    | RigUnhealthy
    | DrainRequested
    | DrainGraceOver
    | GpuFaulted
    | ProbationDue
    | SelfTestDone
    | ReinstateAsked
)


# --- instructions ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartAttempt:
    """Set the attempt up and run it (``AttemptRunner.start``)."""

    assignment: ws.Assignment


@dataclass(frozen=True, slots=True)
class StopMiners:
    """Stop the miners on the assignment's GPUs and wait until their process trees are
    gone; then tell the state :class:`MinersStopped`."""

    assignment: ws.Assignment


@dataclass(frozen=True, slots=True)
class RefuseAttempt:
    """End the assignment at once as a setup failure of the rig's (the broker requeues)."""

    key: AttemptKey
    reason: str


@dataclass(frozen=True, slots=True)
class StopAttempt:
    """Kill the attempt's process tree; ``report``: say ``finished`` (else the broker
    requeues it when the lease lapses)."""

    key: AttemptKey
    reason: str
    report: bool


@dataclass(frozen=True, slots=True)
class DropAttempt:
    """Report an assignment that never started as ended by SIGTERM, with no energy."""

    key: AttemptKey
    reason: str


@dataclass(frozen=True, slots=True)
class WriteFence:
    """Write the lease's stop time for the jobs' fences (``fence.py``)."""


@dataclass(frozen=True, slots=True)
class ResetStream:
    """Break the instruction stream so it reconnects (and begins with a Reconcile)."""

    why: str


@dataclass(frozen=True, slots=True)
class AskBrokerToDrain:
    """FarmService.DrainWorker: the broker places nothing more here. ``until_taken``:
    retry with backoff until the broker takes it (else once, best effort)."""

    reason: str = ""
    until_taken: bool = False


@dataclass(frozen=True, slots=True)
class ReportGpuHealth:
    """Send the rig's whole GPU health (``AgentState.quarantine.report()``) with
    ``WorkerService.ReportGpuHealth``, retried until the broker takes it."""


@dataclass(frozen=True, slots=True)
class RunSelfTest:
    """Self-test GPU ``index`` (it holds no attempt), then tell the state
    :class:`SelfTestDone`."""

    index: int


Instruction = (
    StartAttempt
    | StopMiners
    | RefuseAttempt
    | StopAttempt
    | DropAttempt
    | WriteFence
    | ResetStream
    | AskBrokerToDrain
    | ReportGpuHealth
    | RunSelfTest
)
