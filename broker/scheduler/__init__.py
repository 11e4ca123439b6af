"""The pure scheduler: which pending job runs on which GPUs of which worker.

One placement pipeline, in the style of Kubernetes' scheduling framework, serves a
scheduling pass, preemption and QuoteJob alike:

1. **filter** (``filters``) -- a job's gang of ``gpu_count`` GPUs must come from ONE
   worker and ONE homogeneous group (same model, VRAM, ask price, container runtime,
   verification, score, PCIe bandwidth, host RAM and CPU per GPU). The static filters, in
   order: ``container_runtime`` (for an image job), ``gpu_model`` (exact, when set),
   ``min_vram`` (VRAM >= the minimum), ``max_price`` (ask <= cap, when a cap is set),
   ``verification`` (VERIFIED GPUs only, unless ``allow_unverified``), ``min_score``,
   ``min_pcie``, ``min_host_ram_per_gpu``, ``min_cpu_per_gpu``; then ``gpu_count`` (that
   many free GPUs of the group on one worker). A job nothing survives for gets one
   :class:`Rejection` naming the first filter that eliminated everything.
2. **score** (``scores``) -- among the survivors the choice is the smallest
   :func:`choice_key`, ``(price, topology, -locality, leftover, -reliability, worker_id,
   vram_mb, model)``: cheapest first, then the job's link preference
   (:func:`topology_score`: a gang or a job with ``min_pcie`` to the widest links, a
   single GPU to the narrowest), then a worker that already holds the job's Python
   environment (:func:`locality_score`, Kubernetes' ``ImageLocality``), then best fit
   (fewest free GPUs left in that worker's group, :func:`best_fit_leftover`), then the
   most reliable worker, then the lowest worker id; VRAM and model only break ties
   between two groups of one worker. The gang takes the lowest free indices.
3. **post-filter** (``preemption``) -- for a job no free GPUs can take, the caller may
   ask :func:`preemption_plan` for victims to preempt: a :class:`PreemptionPlan` or a
   structured :class:`Rejection`.
4. **bind** -- the caller's job (``BrokerCore``). This package does no I/O and reads no
   clock; the same input always gives the same result.

Jobs are taken in the order given (the caller sorts by its queue policy). Greedy with
backfill: a job that does not fit is skipped and later, smaller jobs may still be
placed. ``place(snapshot)`` indexes a snapshot and runs one pass;
:class:`FleetIndex` (``index``) is that index kept between passes, updated one worker
at a time, so a pass costs what changed; QuoteJob reads it without taking anything
(:meth:`FleetIndex.probe`, :meth:`FleetIndex.matching`).

Money is integer micro-dollars throughout (STYLE.md item 10).
"""

from broker.scheduler.filters import count_rejection, passes, static_filter
from broker.scheduler.index import FleetIndex, place
from broker.scheduler.preemption import (
    PreemptionCandidate,
    PreemptionPlan,
    Victim,
    preemption_plan,
)
from broker.scheduler.scores import (
    best_fit_leftover,
    choice_key,
    locality_score,
    topology_score,
)
from broker.scheduler.values import (
    GpuSlot,
    GroupSummary,
    JobRequest,
    Placement,
    Rejection,
    SchedulingResult,
    Snapshot,
    Unplaced,
    WorkerCapacity,
)

__all__ = [
    "FleetIndex",
    "GpuSlot",
    "GroupSummary",
    "JobRequest",
    "Placement",
    "PreemptionCandidate",
    "PreemptionPlan",
    "Rejection",
    "SchedulingResult",
    "Snapshot",
    "Unplaced",
    "Victim",
    "WorkerCapacity",
    "best_fit_leftover",
    "choice_key",
    "count_rejection",
    "locality_score",
    "passes",
    "place",
    "preemption_plan",
    "static_filter",
    "topology_score",
]
