"""The frozen values the scheduler reads and returns (STYLE.md 2, 9).

The core turns its records into these (``broker.queue``); the scheduler never sees a
core record, an ORM row or a protobuf message. Money is integer micro-dollars.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "PCIE_STEP_MBPS",
    "SCORE_STEP",
    "GpuSlot",
    "GroupSummary",
    "JobRequest",
    "Placement",
    "Rejection",
    "SchedulingResult",
    "Snapshot",
    "Unplaced",
    "WorkerCapacity",
]

SCORE_STEP = 5
"""The scheduler sees a GPU's score floored to a multiple of this (``min_score`` is matched
against that: a GPU scoring 103 meets ``min_score`` 100 and 95, not 102)."""

PCIE_STEP_MBPS = 100
"""The scheduler sees a GPU's host-to-device MB/s floored to a multiple of this (0.1 GB/s)."""


@dataclass(frozen=True, slots=True)
class GpuSlot:
    """One GPU of a worker as the scheduler sees it.

    ``verified``, ``score`` and ``pcie_mbps`` are the broker's figures for it
    (``broker.queue``): the score is floored to a multiple of :data:`SCORE_STEP` and the
    host-to-device MB/s to a multiple of :data:`PCIE_STEP_MBPS`, so that GPUs of one kind
    whose measurements differ by noise share one group of the index.
    """

    index: int
    model: str
    vram_mb: int
    price_micros_per_gpu_hour: int
    free: bool
    verified: bool = True  # VERIFIED; False: PENDING or UNVERIFIED (allow_unverified jobs only)
    score: int = 0  # rigshift.scoring score, floored to SCORE_STEP
    pcie_mbps: int = 0  # host-to-device MB/s, floored to PCIE_STEP_MBPS (0: unknown)


@dataclass(frozen=True, slots=True)
class WorkerCapacity:
    """All GPUs of one online worker; busy ones have ``free=False``."""

    worker_id: str
    gpus: tuple[GpuSlot, ...]
    reliability_permille: int = 1000  # recent uptime x attempt success; higher is preferred
    # requirements_sha256 of the environments and references of the images it holds
    environments: frozenset[str] = frozenset()
    containers: bool = False  # it has a container runtime (runs image jobs)
    ram_gb_per_gpu: int = 0  # host RAM / GPUs of the rig, whole GiB (0: not reported)
    cpu_millicores_per_gpu: int = 0  # CPU cores / GPUs of the rig, thousandths (0: not reported)


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A pending job. Empty or zero fields mean "any"."""

    job_id: str
    gpu_count: int
    gpu_model: str = ""
    min_vram_mb: int = 0
    max_price_micros_per_gpu_hour: int = 0
    # for locality: its image reference, else the requirements_sha256 of its Python environment
    environment: str = ""
    containers: bool = False  # it runs in an image: only workers with a container runtime
    allow_unverified: bool = False  # False: VERIFIED GPUs only
    min_score: int = 0
    min_pcie_mbps: int = 0  # per GPU, host to device
    min_ram_gb_per_gpu: int = 0
    min_cpu_millicores_per_gpu: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one pass sees; ``pending`` is already in priority order."""

    now: float
    pending: tuple[JobRequest, ...]
    workers: tuple[WorkerCapacity, ...]


@dataclass(frozen=True, slots=True)
class Placement:
    """Decision: run ``job_id`` on these GPUs of ``worker_id`` at this price."""

    job_id: str
    worker_id: str
    gpu_indices: tuple[int, ...]
    price_micros_per_gpu_hour: int


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a filter (or the preemption step) eliminated every GPU for a job.

    ``resolvable`` is True when matching GPUs exist but are busy now (waiting
    may help), False when no registered GPU could ever satisfy the request.
    """

    resource: str
    requested: str
    available: str
    resolvable: bool
    message: str


@dataclass(frozen=True, slots=True)
class Unplaced:
    """A job left pending this pass, with at least one reason."""

    job_id: str
    reasons: tuple[Rejection, ...]


@dataclass(frozen=True, slots=True)
class SchedulingResult:
    """Output of one pass, both lists in the snapshot's pending order."""

    placements: tuple[Placement, ...]
    unplaced: tuple[Unplaced, ...]


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """One homogeneous group of the index that passes a job's static filters."""

    model: str
    vram_mb: int
    price_micros_per_gpu_hour: int
    gpus: int  # GPUs of the group on the indexed workers, busy or free
    free_gpus: int
    containers: bool = False  # its workers run containers
    verified: bool = True
    score: int = 0  # floored to SCORE_STEP
    pcie_mbps: int = 0  # host to device, floored to PCIE_STEP_MBPS
    ram_gb_per_gpu: int = 0
    cpu_millicores_per_gpu: int = 0

    @property
    def key(self) -> tuple[str, int, int, bool, bool, int, int, int, int]:
        """The group's key in the index."""
        return (
            self.model,
            self.vram_mb,
            self.price_micros_per_gpu_hour,
            self.containers,
            self.verified,
            self.score,
            self.pcie_mbps,
            self.ram_gb_per_gpu,
            self.cpu_millicores_per_gpu,
        )
