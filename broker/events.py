"""Events into the broker core and the commands it decides (STYLE.md 1).

Every event is a frozen dataclass that carries ``now`` (seconds since the epoch,
passed in by the shell); every command is a frozen dataclass the shell carries
out (push to an agent, append a log line, notify watchers). Persistence is not
a command: after each batch the shell saves what ``BrokerCore.take_dirty``
names.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.economics import FarmTerms
from broker.model import GpuInfo, JobSpec, JobState, SetupCause, WorkerState

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
    "DrainRequested",
    "Event",
    "FarmConfigured",
    "Heartbeat",
    "JobSubmitted",
    "SchedulePass",
    "Tick",
    "Transition",
    "WorkerRegistered",
    "WorkerTransition",
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
class WorkerRegistered(Event):
    """An agent registered (or registered again after a restart)."""

    worker_id: str
    farm_id: str
    hostname: str
    agent_version: str
    gpus: tuple[GpuInfo, ...]
    metrics_address: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat(Event):
    """A lease renewal; ``environments`` when the agent sent its status, else None."""

    worker_id: str
    environments: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class DrainRequested(Event):
    """Stop placing work on a worker."""

    worker_id: str


@dataclass(frozen=True, slots=True)
class Tick(Event):
    """Periodic clock event: expires leases whose time has come."""


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
    """The attempt's process started, after ``setup_ms`` of setup."""

    setup_ms: int = 0


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
    """Tell a worker to start an attempt on these GPUs."""

    worker_id: str
    job_id: str
    attempt: int
    gpu_indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Cancel(Command):
    """Tell a worker to stop an attempt."""

    worker_id: str
    job_id: str
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class AppendLog(Command):
    """Store output of an attempt and pass it to followers."""

    job_id: str
    attempt: int
    sequence: int
    data: str
