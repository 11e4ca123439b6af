"""The broker core's state records: jobs, attempts, workers and their GPUs.

Mutable dataclasses that only ``BrokerCore`` changes (while it handles an event or
restores); everyone else reads them through the core's public reads. The store turns
them into rows and back (``broker.store``), ``broker.convert`` into messages.

:class:`StoredState` is what the store hands ``BrokerCore.restore`` after a restart.
Reads that the core answers with frozen values (QuoteJob's :class:`Quote`) live here
too. :func:`reliability` is the pure score the scheduler ranks workers by.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from broker.economics import FarmTerms, LedgerEntry, reliability_permille
from broker.model import (
    LIVE_ATTEMPT_STATES,
    AttemptState,
    GpuInfo,
    JobSpec,
    JobState,
    SlaKind,
    WorkerState,
)
from broker.scheduler import GroupSummary, Rejection
from broker.windows import Window
from rigshift.scoring import Measurement, Verdict, judge

__all__ = [
    "OUTCOME_BUCKETS",
    "Attempt",
    "AttemptOutput",
    "Effects",
    "Gpu",
    "HistoryEntry",
    "Job",
    "Quote",
    "SlaEvent",
    "StoredState",
    "Worker",
    "record_outcome",
    "reliability",
    "trim_history",
]


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
    # The power limit the agent was told to run it at (W; 0: the operator's own limit):
    # its first GPU's AI limit when it was placed. Earnings read it for the energy saved.
    power_limit_watts: int = 0

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
    # What the broker makes of the GPU's measurement (rigshift.scoring.judge): set at
    # registration and whenever a probation re-test brings new figures.
    verdict: Verdict = field(default_factory=lambda: judge("", 0, None))
    measurement: Measurement | None = None  # the latest figures (registration or re-test)
    quarantine_reason: str = ""  # non-empty: QUARANTINED (no placements, earns nothing)
    quarantined_at: float | None = None
    reinstate_required: bool = False  # three strikes in 24 h: out until the operator says
    # The limit it runs AI work at under its farm's power policy (W; 0: its board limit),
    # ``broker.gpu_health.ai_limit``; ``verdict.score`` is scaled to it.
    ai_power_limit_watts: int = 0


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
    # (bucket start, ok, lost): attempts counted per OUTCOME_BUCKETS-th of the reliability
    # window (record_outcome), so a rig running short jobs holds at most that many entries.
    outcomes: list[tuple[float, int, int]] = field(default_factory=list)
    # requirements_sha256 of the Python environments and references of the container images
    # the rig holds; None until it says.
    environments: frozenset[str] | None = None
    runtime_name: str = ""  # container runtime (e.g. "podman"); empty: runs no containers
    runtime_version: str = ""
    host_ram_mb: int = 0  # the rig's host RAM, CPU cores and disk speed (0: not reported)
    cpu_cores: int = 0
    disk_write_mbps: int = 0


@dataclass(frozen=True, slots=True)
class StoredState:
    """Everything a restarted broker's core is rebuilt from (``BrokerCore.restore``).

    The records become the core's own: the store builds them and keeps no reference.
    A worker's ``lease_expires_at`` is set by ``restore`` (a grace period), whatever
    it holds here.
    """

    farms: tuple[FarmTerms, ...] = ()
    workers: tuple[Worker, ...] = ()
    jobs: tuple[Job, ...] = ()
    ledger: tuple[LedgerEntry, ...] = ()
    curtailments: tuple[Window, ...] = ()  # every curtailment window, past ones too


@dataclass(frozen=True, slots=True)
class Quote:
    """What a job of some spec would find now (QuoteJob); prices per GPU-hour, what the job
    would pay (a spot job's discount and the farm's floor applied)."""

    matching_gpus: int
    free_matching_gpus: int
    min_price_micros_per_gpu_hour: int
    max_price_micros_per_gpu_hour: int
    placeable_now: bool
    reasons: tuple[Rejection, ...]
    groups: tuple[GroupSummary, ...] = ()  # the matching groups, cheapest first (at most 50)


def reliability(worker: Worker, now: float, window_s: float) -> int:
    """Reliability of a worker over the ``window_s`` before ``now``, in thousandths: its
    uptime share times its attempts' success share (``economics.reliability_permille``).
    Pure: history older than the window is skipped here and dropped by
    :func:`trim_history` (on ``Tick``)."""
    start = max(now - window_s, worker.first_seen)
    spans = worker.offline_log
    if worker.offline_since is not None:
        spans = [*spans, (worker.offline_since, now)]
    offline = sum(max(0.0, min(b, now) - max(a, start)) for a, b in spans)
    outcomes = worker.outcomes
    recent = outcomes[bisect_left(outcomes, (start,)) :]  # the buckets starting >= start
    ok = sum(n for _, n, _ in recent)
    return reliability_permille(now - start, offline, ok, sum(n for _, _, n in recent))


#: How many buckets a worker's attempt outcomes are counted in over the reliability window.
#: The bucket that straddles the window's start is left out of ``reliability`` (at most a
#: 96th of the window), which is what keeps a rig's history bounded, however short its jobs.
OUTCOME_BUCKETS = 96


def record_outcome(worker: Worker, now: float, ok: bool, window_s: float) -> None:
    """Count one finished attempt of ``worker`` (``ok``: not lost, not the rig's fault)."""
    width = window_s / OUTCOME_BUCKETS
    start = now - now % width if width > 0 else now
    outcomes = worker.outcomes
    if outcomes and outcomes[-1][0] == start:
        _, good, bad = outcomes[-1]
        outcomes[-1] = (start, good + ok, bad + (not ok))
    else:
        outcomes.append((start, int(ok), int(not ok)))


def trim_history(worker: Worker, horizon: float) -> bool:
    """Drop the outcomes and offline spans that ended before ``horizon`` (they can never
    count again: events only move the clock forward); True when anything was dropped."""
    trimmed = False
    outcomes = worker.outcomes
    if outcomes and outcomes[0][0] < horizon:
        del outcomes[: bisect_left(outcomes, (horizon,))]
        trimmed = True
    log = worker.offline_log
    if log and log[0][1] < horizon:
        worker.offline_log = [span for span in log if span[1] >= horizon]
        trimmed = True
    return trimmed


@dataclass(slots=True)
class Effects:
    """What the event being handled means for the shell, gathered while it is handled and
    returned by ``handle`` as its last commands (an event that raises a ``BrokerError``
    has changed nothing; what a bug left half done goes out with the next event)."""

    jobs: set[str] = field(default_factory=set)
    workers: dict[str, None] = field(default_factory=dict)  # ordered: the caches follow it
    ledger: list[LedgerEntry] = field(default_factory=list)
    schedule: bool = False
