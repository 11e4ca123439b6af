"""Core model: the frozen values the broker core works with.

These are neither ORM rows (``broker.store``) nor protobuf messages
(``rigshift.v1``); conversion happens at the edges (``broker.convert``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from rigshift.power import PowerPoint
from rigshift.scoring import Measurement

__all__ = [
    "TERMINAL_JOB_STATES",
    "AttemptState",
    "GpuInfo",
    "JobSpec",
    "JobState",
    "SetupCause",
    "SlaKind",
    "Tier",
    "WorkerState",
]


class JobState(StrEnum):
    """Lifecycle of a job (AIP-216); the names match ``rigshift.v1.Job.State``."""

    PENDING = "PENDING"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class AttemptState(StrEnum):
    """Lifecycle of one placement; names match ``rigshift.v1.Attempt.State``."""

    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    LOST = "LOST"
    PREEMPTED = "PREEMPTED"
    PREPARING = "PREPARING"


LIVE_ATTEMPT_STATES = frozenset(
    {AttemptState.SCHEDULED, AttemptState.PREPARING, AttemptState.RUNNING}
)


class SetupCause(StrEnum):
    """Whose fault a failed setup was; names match ``rigshift.v1.Finished.Cause``."""

    SETUP_CLIENT = "SETUP_CLIENT"  # the job's spec: fail the job, no further attempts
    SETUP_RIG = "SETUP_RIG"  # the rig: requeue the job while it has attempts left


class Tier(StrEnum):
    """Service tier; names match ``rigshift.v1.Tier``."""

    GUARANTEED = "GUARANTEED"
    SPOT = "SPOT"


class SlaKind(StrEnum):
    """Kinds of SLA events; names match ``rigshift.v1.SlaEvent.Kind``."""

    START_DEADLINE_MISSED = "START_DEADLINE_MISSED"
    INTERRUPTION = "INTERRUPTION"
    LOST_WORK = "LOST_WORK"
    HEARTBEAT_GAP = "HEARTBEAT_GAP"
    CURTAILED = "CURTAILED"


class WorkerState(StrEnum):
    """Lifecycle of a worker; names match ``rigshift.v1.Worker.State``."""

    ONLINE = "ONLINE"
    DRAINING = "DRAINING"
    OFFLINE = "OFFLINE"


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a client asked to run. Validated before it reaches the core."""

    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    gpu_count: int = 1
    gpu_model: str = ""
    min_vram_mb: int = 0
    max_price_micros_per_gpu_hour: int = 0
    max_duration_seconds: int = 0
    working_dir_sha256: str = ""
    max_attempts: int = 3
    display_name: str = ""
    tier: Tier = Tier.GUARANTEED
    python_requirements: str = ""
    """Normalised pip requirements (one per line); empty: the rig's own Python."""
    requirements_sha256: str = ""
    """sha256 of ``python_requirements``; empty when there are none."""
    inputs: tuple[tuple[str, str], ...] = ()
    """(name, sha256 of the uploaded archive), sorted by name."""
    image: str = ""
    """OCI image reference to run the command in; empty: no container."""
    min_pcie_mbps: int = 0
    """Least measured host-to-device bandwidth per GPU, MB/s (``min_pcie_gbps`` x 1000)."""
    min_host_ram_gb_per_gpu: int = 0
    """Least host RAM per GPU of the rig (its RAM / its GPUs), GB (GiB of MiB reports)."""
    min_cpu_millicores_per_gpu: int = 0
    """Least CPU cores per GPU of the rig, thousandths (``min_cpu_cores_per_gpu`` x 1000)."""
    min_score: int = 0
    """Least GPU score (``rigshift.scoring``; an RTX 3090 = 100)."""
    allow_unverified: bool = False
    """Also run on GPUs that are not VERIFIED (PENDING or UNVERIFIED)."""


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """A GPU as the agent reported it at registration."""

    index: int
    uuid: str
    model: str
    vram_mb: int
    power_limit_watts: int = 0
    price_micros_per_gpu_hour: int = 0
    pcie_link_width: int = 16
    pcie_generation: int = 0
    measurement: Measurement | None = None
    """The self-test's figures sent with the registration; None: not measured (PENDING)."""
    power_curve: tuple[PowerPoint, ...] = ()
    """Throughput and draw per power limit (the self-test's sweep), lowest limit first."""
    power_limit_settable: bool = False
    """The agent may set this GPU's power limit (root and a card that supports it)."""
