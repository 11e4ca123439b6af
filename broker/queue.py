"""The pending queue and the capacity caches: what a scheduling pass sees.

The core keeps two views of its records for the scheduler, both caches (none of them
is a decision, and each is rebuilt by ``BrokerCore.restore``):

* :class:`Capacities` -- per ONLINE worker the :class:`WorkerCapacity` the scheduler
  sees (GPU slots interned, so a rebuild allocates only the tuple), and the
  :class:`FleetIndex` of them all, kept between passes. The core brings both up to
  date at the end of every event for the workers that event changed, so a read
  (``BrokerCore.quote``, ``snapshot``) never has to. A worker's reliability is taken
  at the ``now`` of the event that last changed it: a value fixed by events, never by
  when someone looked.
* a :class:`SchedulingView` -- what a pass places. The core tells it which jobs are
  queued (with their place under the queue policy, fixed at submission) and which
  workers changed, and asks it for each pass's decisions. :class:`KeptQueue`, the
  broker's, keeps the queue sorted as jobs enter it (no sort per pass) and places on
  the core's kept index. Another view may be injected at construction
  (``BrokerCore(view=...)``): the trace replay's lean view (``benchmarks/replay``) and
  the tests' snapshot-per-pass reference do; binding, preemption and everything after
  stay the core's.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Callable
from typing import Protocol

from broker.model import GpuInfo, JobSpec, Tier
from broker.policy import Fifo, QueuedJob, ShortFirst
from broker.records import Gpu, Job, Worker
from broker.scheduler import FleetIndex, GpuSlot, JobRequest, SchedulingResult, WorkerCapacity
from broker.scheduler.values import PCIE_STEP_MBPS, SCORE_STEP
from rigshift.scoring import Verification

__all__ = [
    "LANE_MBPS",
    "Capacities",
    "KeptQueue",
    "SchedulingView",
    "job_request",
    "pcie_mbps",
    "priority",
]

LANE_MBPS = {1: 200, 2: 400, 3: 800, 4: 1600, 5: 3200, 6: 6400}
"""Host-to-device MB/s one PCIe lane gives per generation, about 80 % of the line rate:
what :func:`pcie_mbps` estimates a link from when the GPU was not measured."""


def pcie_mbps(gpu: Gpu) -> int:
    """The host-to-device MB/s the scheduler sees for ``gpu``: the latest measurement's
    ``h2d_mbps``; when there is none, an estimate from the link's generation (3 when
    not reported, the mining-era default) and width (:data:`LANE_MBPS`). An unmeasured GPU
    is PENDING, so only ``allow_unverified`` jobs (and the trace replay) ever meet the
    estimate. Floored to ``PCIE_STEP_MBPS``."""
    m = gpu.measurement or gpu.info.measurement
    mbps = m.h2d_mbps if m is not None and m.h2d_mbps > 0 else _estimate(gpu.info)
    return mbps - mbps % PCIE_STEP_MBPS


def _estimate(info: GpuInfo) -> int:
    return LANE_MBPS.get(info.pcie_generation or 3, 800) * max(info.pcie_link_width, 1)


def job_request(job_id: str, spec: JobSpec, spot_permille: int) -> JobRequest:
    """A job as the scheduler sees it. A spot job's price cap applies to the discounted
    price, so the scheduler compares the ask with the cap scaled back up."""
    cap = spec.max_price_micros_per_gpu_hour
    if cap and spec.tier == Tier.SPOT:
        cap = cap * 1000 // spot_permille
    # An image job's locality is the image (its requirements install on top of it).
    environment = spec.image or spec.requirements_sha256
    return JobRequest(
        job_id,
        spec.gpu_count,
        spec.gpu_model,
        spec.min_vram_mb,
        cap,
        environment,
        bool(spec.image),
        spec.allow_unverified,
        spec.min_score,
        spec.min_pcie_mbps,
        spec.min_host_ram_gb_per_gpu,
        spec.min_cpu_millicores_per_gpu,
    )


def priority(job: Job, policy: Fifo | ShortFirst) -> tuple:
    """Sort key of a pending job under ``policy``; smallest first. It depends only on what
    is fixed at submission (a requeued job keeps its place)."""
    s = job.spec
    queued = QueuedJob(
        job.job_id, job.create_time, s.gpu_count, s.max_duration_seconds, s.tier == Tier.SPOT
    )
    return policy.key(queued)


class SchedulingView(Protocol):
    """What a scheduling pass places: told of the queue and the fleet by the core."""

    def job_queued(self, job_id: str, key: tuple, request: JobRequest) -> None:
        """A job became PENDING; ``key`` is its place in the queue (smallest first)."""

    def job_dequeued(self, job_id: str) -> None:
        """A job stopped being PENDING."""

    def worker_changed(self, worker_id: str, capacity: WorkerCapacity | None) -> None:
        """What the scheduler sees of a worker changed; None: it takes no work now."""

    def place(self, fleet: FleetIndex, now: float) -> SchedulingResult:
        """One pass's placements and rejections, in queue order. ``fleet`` is the core's
        kept index of every ONLINE worker (a view may place on it: it takes the GPUs it
        places, and the core updates the bound workers after the pass). Jobs a view
        leaves out of the result keep their earlier pending reasons."""


class KeptQueue:
    """The broker's view: the queue kept sorted, placed on the core's kept index.

    Entries of jobs that left the queue are dropped lazily, when a pass walks it; a job
    queued again while its old entry is still there keeps that entry (same key).
    """

    __slots__ = ("_entries", "_live", "_queue")

    def __init__(self) -> None:
        self._queue: list[tuple[tuple, str]] = []  # (key, job_id) sorted; may hold stale ids
        self._entries: set[str] = set()  # job ids with an entry in _queue
        self._live: dict[str, JobRequest] = {}  # queued job -> what the scheduler sees

    def job_queued(self, job_id: str, key: tuple, request: JobRequest) -> None:
        self._live[job_id] = request
        if job_id not in self._entries:
            self._entries.add(job_id)
            insort(self._queue, (key, job_id))

    def job_dequeued(self, job_id: str) -> None:
        self._live.pop(job_id, None)

    def worker_changed(self, worker_id: str, capacity: WorkerCapacity | None) -> None:
        pass  # the core keeps the index this view places on

    def requests(self) -> list[JobRequest]:
        """The queued jobs in order (dropping the entries of jobs that left)."""
        live = self._live
        queue = self._queue
        kept = [e for e in queue if e[1] in live]
        if len(kept) != len(queue):
            self._entries.difference_update(e[1] for e in queue if e[1] not in live)
            self._queue = kept
        return [live[e[1]] for e in kept]

    def place(self, fleet: FleetIndex, now: float) -> SchedulingResult:
        return fleet.place(self.requests())


class Capacities:
    """Per ONLINE worker, the capacity the scheduler sees, and their kept FleetIndex.

    Per GPU: its verification (VERIFIED or not), its score floored to ``SCORE_STEP`` and
    its host-to-device MB/s (:func:`pcie_mbps`). A QUARANTINED GPU is not shown at all
    (neither free nor counted); the core calls ``_worker_changed`` when that changes. Per
    worker: host RAM (whole GiB) and CPU millicores divided by all of its GPUs (0 when
    the rig did not report them: such a rig meets no minimum).
    """

    __slots__ = ("_floors_of", "_in", "_slots", "fleet", "floors", "of")

    def __init__(self) -> None:
        self._slots: dict[tuple[int, str, int, int, bool, bool, int, int], GpuSlot] = {}
        self.of: dict[str, WorkerCapacity] = {}  # ONLINE worker id -> its capacity
        self.fleet = FleetIndex()
        # Workers kept in another index than ``fleet`` (a farm with a curtailment window
        # coming: ``broker.curtailment``), worker id -> that index.
        self._in: dict[str, FleetIndex] = {}
        # QuoteJob's spot prices (``broker.quotes``): per group key of ``fleet``, how many of
        # its GPUs have each floor price; per worker in ``fleet``, its (group key, floor)s.
        self.floors: dict[tuple, dict[int, int]] = {}
        self._floors_of: dict[str, list[tuple[tuple, int]]] = {}

    def slots(self, worker: Worker) -> tuple[GpuSlot, ...]:
        """The worker's GPUs as they are now, in index order (interned values).

        The GPUs of one model (VRAM, ask and verification) on one rig are shown at the
        weakest one's score and link: a gang runs at the pace of its slowest GPU, and
        GPUs that differ by the self-test's noise must not split the rig into groups no
        gang could span."""
        interned = self._slots
        live = [worker.gpus[i] for i in sorted(worker.gpus) if not worker.gpus[i].quarantine_reason]
        weakest: dict[tuple[str, int, int, bool], tuple[int, int]] = {}
        for gpu in live:  # a QUARANTINED GPU is not shown at all (docs/health.md)
            i = gpu.info
            verified = gpu.verdict.verification == Verification.VERIFIED
            cls = (i.model, i.vram_mb, i.price_micros_per_gpu_hour, verified)
            score, link = gpu.verdict.score, pcie_mbps(gpu)
            low = weakest.get(cls)
            weakest[cls] = (score, link) if low is None else (min(low[0], score), min(low[1], link))
        out = []
        for gpu in live:
            i = gpu.info
            verified = gpu.verdict.verification == Verification.VERIFIED
            score, link = weakest[(i.model, i.vram_mb, i.price_micros_per_gpu_hour, verified)]
            key = (
                i.index,
                i.model,
                i.vram_mb,
                i.price_micros_per_gpu_hour,
                gpu.holder is None,
                verified,
                score - score % SCORE_STEP,
                link,
            )
            slot = interned.get(key)
            if slot is None:
                slot = interned[key] = GpuSlot(*key)
            out.append(slot)
        return tuple(out)

    def capacity(self, worker: Worker, reliability_permille: int = 1000) -> WorkerCapacity:
        """What the scheduler sees of ``worker`` as it is now (not kept)."""
        gpus = max(len(worker.gpus), 1)
        return WorkerCapacity(
            worker.worker_id,
            self.slots(worker),
            reliability_permille,
            worker.environments or frozenset(),
            bool(worker.runtime_name),
            worker.host_ram_mb // 1024 // gpus,
            worker.cpu_cores * 1000 // gpus,
        )

    def update(
        self,
        worker: Worker,
        reliability_permille: int,
        index: FleetIndex | None = None,
        floor: Callable[[Worker, int], int] | None = None,
    ) -> WorkerCapacity:
        """Take up an ONLINE worker as it is now, in ``index`` (default: ``fleet``, the
        index every pass places on); returns what the scheduler sees of it. ``floor``: the
        floor price of one of its GPUs (by index), counted per group for QuoteJob."""
        cap = self.capacity(worker, reliability_permille)
        wid = worker.worker_id
        self._unfloor(wid)
        if floor is not None and (index is None or index is self.fleet):
            self._floor(cap, worker, floor)
        target = self.fleet if index is None else index
        was = self._in.get(wid, self.fleet)
        if was is not target:
            was.remove(wid)
        if index is None or index is self.fleet:
            self._in.pop(wid, None)
        else:
            self._in[wid] = index
        self.of[wid] = cap
        target.update(cap)
        return cap

    def _floor(
        self, cap: WorkerCapacity, worker: Worker, floor: Callable[[Worker, int], int]
    ) -> None:
        mine: list[tuple[tuple, int]] = []
        containers, ram, cpu = cap.containers, cap.ram_gb_per_gpu, cap.cpu_millicores_per_gpu
        for g in cap.gpus:
            key = (  # the GPU's group in the index (GroupSummary.key)
                g.model,
                g.vram_mb,
                g.price_micros_per_gpu_hour,
                containers,
                g.verified,
                g.score,
                g.pcie_mbps,
                ram,
                cpu,
            )
            value = floor(worker, g.index)
            counts = self.floors.setdefault(key, {})
            counts[value] = counts.get(value, 0) + 1
            mine.append((key, value))
        self._floors_of[worker.worker_id] = mine

    def _unfloor(self, worker_id: str) -> None:
        for key, value in self._floors_of.pop(worker_id, ()):
            counts = self.floors[key]
            left = counts[value] - 1
            if left:
                counts[value] = left
            else:
                del counts[value]
                if not counts:
                    del self.floors[key]

    def remove(self, worker_id: str) -> None:
        """Forget a worker that takes no work now (offline, draining, curtailed)."""
        self._unfloor(worker_id)
        if self.of.pop(worker_id, None) is not None:
            self._in.pop(worker_id, self.fleet).remove(worker_id)
