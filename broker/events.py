"""Events into the broker core and the commands it decides (STYLE.md 1).

Every event is a frozen dataclass that carries ``now`` (seconds since the epoch,
passed in by the shell); every command is a frozen dataclass the shell carries
out. ``BrokerCore.handle(event)`` returns them in order: first the decisions
(:class:`Transition`, :class:`WorkerTransition`, :class:`Assign`, :class:`Cancel`,
:class:`SendReinstate`, :class:`SendCurtail`, :class:`AppendLog`), then what the event
means for the shell's own duties, each at most once per event and in this order:

* :class:`PostLedger` -- ledger entries to write (settlements, SLA credits);
* :class:`Persist` -- the ids of the jobs and workers to write. Ids, not copies: the
  store reads those records through the core's public reads (``BrokerCore.job``,
  ``BrokerCore.worker``) when it writes them, after the batch, so an event never pays
  for copying a job, and a batch writes each record once however many of its events
  changed it;
* :class:`RequestSchedule` -- something changed that a scheduling pass may act on.

:class:`Writes` folds the commands of a batch into what the store writes in one
transaction (``Store.save``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from broker.economics import FarmTerms, LedgerEntry
from broker.model import GpuInfo, JobSpec, JobState, SetupCause, WorkerState
from broker.windows import Window
from rigshift.scoring import Measurement

__all__ = [
    "AppendLog",
    "Assign",
    "AttemptCheckpointed",
    "AttemptFinished",
    "AttemptLog",
    "AttemptOutputReported",
    "AttemptPreparing",
    "AttemptProgress",
    "AttemptReport",
    "AttemptStarted",
    "Cancel",
    "CancelRequested",
    "Command",
    "CurtailmentCancelled",
    "CurtailmentScheduled",
    "DrainRequested",
    "Event",
    "FarmConfigured",
    "GpuHealth",
    "GpuHealthReported",
    "Heartbeat",
    "JobSubmitted",
    "JobsStored",
    "Persist",
    "PostLedger",
    "ReinstateRequested",
    "RequestSchedule",
    "SchedulePass",
    "SendCurtail",
    "SendReinstate",
    "Tick",
    "Transition",
    "WorkerRegistered",
    "WorkerTransition",
    "Writes",
]


# --- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """Base of all events; ``now`` is the shell's clock reading."""

    now: float


@dataclass(frozen=True, slots=True)
class JobSubmitted(Event):
    """A validated job arrived; ``job_id`` was chosen by the shell."""

    job_id: str
    owner: str
    spec: JobSpec
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class CancelRequested(Event):
    """The owner asked to cancel a job."""

    job_id: str


@dataclass(frozen=True, slots=True)
class GpuHealth:
    """One GPU's health as its agent decided it (``rigshift.v1.GpuHealth``): the broker
    mirrors it, never decides a quarantine itself."""

    index: int
    quarantined: bool = False
    reason: str = ""
    since: float | None = None  # when it was quarantined
    reinstate_required: bool = False  # three strikes in 24 h: out until the operator says
    measurement: Measurement | None = None  # a probation re-test's figures, if any


@dataclass(frozen=True, slots=True)
class WorkerRegistered(Event):
    """An agent registered (or registered again after a restart), with its self-test's
    figures (per GPU in ``GpuInfo.measurement``, the host's here) and the health of any
    GPU it holds in quarantine."""

    worker_id: str
    farm_id: str
    hostname: str
    agent_version: str
    gpus: tuple[GpuInfo, ...]
    metrics_address: str = ""
    runtime_name: str = ""  # container runtime (e.g. "podman"); empty: runs no containers
    runtime_version: str = ""
    host_ram_mb: int = 0
    cpu_cores: int = 0
    disk_write_mbps: int = 0
    health: tuple[GpuHealth, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuHealthReported(Event):
    """The agent's whole view of its GPUs' health (ReportGpuHealth); idempotent. A GPU the
    report does not name is healthy."""

    worker_id: str
    gpus: tuple[GpuHealth, ...]


@dataclass(frozen=True, slots=True)
class ReinstateRequested(Event):
    """The farm's operator (or an admin) returns a GPU held out after three strikes to
    probation (ReinstateGpu); the servicer checked who asks."""

    worker_id: str
    gpu_index: int
    requested_by: str


@dataclass(frozen=True, slots=True)
class Heartbeat(Event):
    """A lease renewal; ``environments`` when the agent sent its status, else None: the
    requirements_sha256 of its Python environments and the references of its images."""

    worker_id: str
    environments: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class DrainRequested(Event):
    """Stop placing work on a worker."""

    worker_id: str


@dataclass(frozen=True, slots=True)
class Tick(Event):
    """Periodic clock event: expires leases whose time has come, and drops worker history
    that left the reliability window."""


@dataclass(frozen=True, slots=True)
class SchedulePass(Event):
    """Run the scheduler over every pending job."""


@dataclass(frozen=True, slots=True)
class AttemptReport(Event):
    """Base of agent reports about one attempt; ``sequence`` dedups retries."""

    worker_id: str
    job_id: str
    attempt: int
    sequence: int


@dataclass(frozen=True, slots=True)
class AttemptPreparing(AttemptReport):
    """The agent began setting the attempt up (environment, inputs, working directory)."""


@dataclass(frozen=True, slots=True)
class AttemptStarted(AttemptReport):
    """The attempt's process started, after ``setup_ms`` of setup. ``rig_lead_s``: how
    long before the last event of the same report it started, by the rig's clock (0: the
    last event, or not known); a report that carries both the start and the finish of a
    short job would otherwise charge it nothing."""

    setup_ms: int = 0
    rig_lead_s: float = 0.0


@dataclass(frozen=True, slots=True)
class AttemptOutputReported(AttemptReport):
    """The agent archived the attempt's output directory (``sha256`` empty: not kept)."""

    sha256: str = ""
    size_bytes: int = 0
    over_limit: bool = False
    message: str = ""


@dataclass(frozen=True, slots=True)
class AttemptLog(AttemptReport):
    """The process wrote output."""

    data: str = ""


@dataclass(frozen=True, slots=True)
class AttemptProgress(AttemptReport):
    """Cumulative metering of a running attempt."""

    energy_joules: int = 0


@dataclass(frozen=True, slots=True)
class AttemptCheckpointed(AttemptReport):
    """The job wrote a checkpoint; the agent uploaded it to the artifact store."""

    sha256: str = ""


@dataclass(frozen=True, slots=True)
class FarmConfigured(Event):
    """A farm was created or its economics changed."""

    terms: FarmTerms


@dataclass(frozen=True, slots=True)
class JobsStored(Event):
    """The store committed these jobs (a batch's ``Persist``): the core forgets each one
    that is finished and holds no live attempt (docs/scale.md section 1). No commands."""

    job_ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class CurtailmentScheduled(Event):
    """A farm's curtailment window was created (CreateCurtailment; the shell stored it)."""

    window: Window


@dataclass(frozen=True, slots=True)
class CurtailmentCancelled(Event):
    """A window that had not ended was cancelled (CancelCurtailment; the shell stored it)."""

    curtailment_id: str


@dataclass(frozen=True, slots=True)
class AttemptFinished(AttemptReport):
    """The process ended (or could not start)."""

    exit_code: int = 0
    energy_joules: int = 0
    message: str = ""
    cause: SetupCause | None = None  # set when setup failed before the process started
    setup_ms: int = 0


# --- commands ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """Base of all commands."""


@dataclass(frozen=True, slots=True)
class Transition(Command):
    """A job changed state (the shell notifies watchers)."""

    job_id: str
    from_state: JobState | None
    to_state: JobState
    reason: str


@dataclass(frozen=True, slots=True)
class WorkerTransition(Command):
    """A worker changed state."""

    worker_id: str
    from_state: WorkerState | None
    to_state: WorkerState


@dataclass(frozen=True, slots=True)
class Assign(Command):
    """Tell a worker to start an attempt on these GPUs: everything the agent needs
    (``broker.convert.assignment_pb`` builds the message from this alone). The shell adds
    its own limits (the largest output archive it keeps)."""

    worker_id: str
    job_id: str
    attempt: int
    gpu_indices: tuple[int, ...]
    spec: JobSpec
    price_micros_per_gpu_hour: int
    checkpoint_sha256: str = ""  # the job's latest checkpoint, to resume from
    power_limit_watts: int = 0  # the farm's power policy's limit for it (0: none)


@dataclass(frozen=True, slots=True)
class Cancel(Command):
    """Tell a worker to stop an attempt."""

    worker_id: str
    job_id: str
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class SendReinstate(Command):
    """Tell a worker's agent to forget a GPU's strikes and re-test it
    (``Instruction.reinstate``)."""

    worker_id: str
    gpu_index: int
    requested_by: str


@dataclass(frozen=True, slots=True)
class SendCurtail(Command):
    """Tell a worker's agent its farm's curtailment window began (``active``: no miner,
    idle GPUs stay idle until ``end_time``) or ended (``Instruction.curtail``)."""

    worker_id: str
    active: bool
    end_time: float = 0.0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AppendLog(Command):
    """Store output of an attempt and pass it to followers."""

    job_id: str
    attempt: int
    sequence: int
    data: str


@dataclass(frozen=True, slots=True)
class PostLedger(Command):
    """Write these ledger entries (whole balanced transactions, in order)."""

    entries: tuple[LedgerEntry, ...]


@dataclass(frozen=True, slots=True)
class Persist(Command):
    """Write these jobs and workers as the core holds them (read through its public reads)."""

    job_ids: frozenset[str] = frozenset()
    worker_ids: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RequestSchedule(Command):
    """Run a scheduling pass soon: jobs were queued, or capacity freed or changed."""


@dataclass(frozen=True, slots=True)
class Writes:
    """What the commands of a batch ask the store to write, in one transaction."""

    job_ids: frozenset[str] = frozenset()
    worker_ids: frozenset[str] = frozenset()
    ledger: tuple[LedgerEntry, ...] = ()
    logs: tuple[AppendLog, ...] = ()

    @classmethod
    def of(cls, cmds: Iterable[Command]) -> Writes:
        """Fold ``Persist``, ``PostLedger`` and ``AppendLog`` commands, in order."""
        jobs: set[str] = set()
        workers: set[str] = set()
        ledger: list[LedgerEntry] = []
        logs: list[AppendLog] = []
        for cmd in cmds:
            match cmd:
                case Persist():
                    jobs |= cmd.job_ids
                    workers |= cmd.worker_ids
                case PostLedger():
                    ledger += cmd.entries
                case AppendLog():
                    logs.append(cmd)
        return cls(frozenset(jobs), frozenset(workers), tuple(ledger), tuple(logs))

    def __or__(self, later: Writes) -> Writes:
        return Writes(
            self.job_ids | later.job_ids,
            self.worker_ids | later.worker_ids,
            self.ledger + later.ledger,
            self.logs + later.logs,
        )

    def __bool__(self) -> bool:
        return bool(self.job_ids or self.worker_ids or self.ledger or self.logs)
