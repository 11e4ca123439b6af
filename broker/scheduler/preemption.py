"""The preemption step: room for a job that no free GPUs can take (STYLE.md 2).

Kubernetes' scheduling framework runs *PostFilter* plugins for a pod that every node
filtered out; its default plugin looks for victims to evict. This is that step, a pure
function: :func:`preemption_plan` takes a job the pass left unplaced and the workers
that run preemptible attempts, and returns a :class:`PreemptionPlan` or a structured
:class:`Rejection` (``resource="preemption"``). The caller (``BrokerCore``) decides who
may preempt whom (a guaranteed job, spot attempts) and carries the plan out.

The GPUs a plan may use pass the same static filters as a placement
(:func:`broker.scheduler.filters.passes`), and a gang comes from one homogeneous group
(model, VRAM, ask, verification, score, PCIe bandwidth), as a placement's does. Per
worker and per homogeneous group, the victims are taken least progress lost first (the
most recently scheduled attempt), until the group's free GPUs plus the victims' GPUs in
it make a gang. Among all such candidates the plan is the smallest key ``(victims, ask,
worker_id, first GPU index of the group)``: fewest attempts preempted, then the cheapest
ask, then worker id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from broker.scheduler.filters import passes
from broker.scheduler.values import JobRequest, Rejection, WorkerCapacity

__all__ = ["PreemptionCandidate", "PreemptionPlan", "Victim", "preemption_plan"]


@dataclass(frozen=True, slots=True)
class Victim:
    """A live attempt the caller allows to be preempted, and the GPUs it holds."""

    job_id: str
    attempt: int
    gpu_indices: tuple[int, ...]
    schedule_time: float


@dataclass(frozen=True, slots=True)
class PreemptionCandidate:
    """An online worker as it is now (busy GPUs ``free=False``) and its victims."""

    worker: WorkerCapacity
    victims: tuple[Victim, ...]


@dataclass(frozen=True, slots=True)
class PreemptionPlan:
    """Preempt ``victims`` (in this order), then place the job on these GPUs at this ask."""

    worker_id: str
    gpu_indices: tuple[int, ...]
    price_micros_per_gpu_hour: int
    victims: tuple[Victim, ...]


def preemption_plan(
    job: JobRequest, candidates: Iterable[PreemptionCandidate]
) -> PreemptionPlan | Rejection:
    """The cheapest way to make room for ``job`` by preempting victims, or why there is none."""
    n = job.gpu_count
    best: tuple[tuple[int, int, str, int], PreemptionPlan] | None = None
    most_room = 0
    for candidate in candidates:
        worker = candidate.worker
        held_by: dict[int, Victim] = {}
        for victim in candidate.victims:
            for index in victim.gpu_indices:
                held_by[index] = victim
        # group -> GPU indices, in order
        groups: dict[tuple[int, str, int, bool, int, int], list[int]] = {}
        for slot in sorted(worker.gpus, key=lambda s: s.index):
            if passes(job, slot, worker):
                shape = (
                    slot.price_micros_per_gpu_hour,
                    slot.model,
                    slot.vram_mb,
                    slot.verified,
                    slot.score,
                    slot.pcie_mbps,
                )
                groups.setdefault(shape, []).append(slot.index)
        free_at = {slot.index for slot in worker.gpus if slot.free}
        for (ask, *_), indices in groups.items():
            room = [i for i in indices if i in free_at]
            in_group: dict[Victim, list[int]] = {}
            for i in indices:
                holder = held_by.get(i)
                if holder is not None:
                    in_group.setdefault(holder, []).append(i)
            # Least progress lost first: the most recently scheduled attempts.
            order = sorted(in_group, key=lambda v: (-v.schedule_time, v.job_id, v.attempt))
            chosen: list[Victim] = []
            for victim in order:
                if len(room) >= n:
                    break
                chosen.append(victim)
                room += in_group[victim]
            most_room = max(most_room, len(room))
            if len(room) < n or not chosen:
                continue
            key = (len(chosen), ask, worker.worker_id, indices[0])
            if best is None or key < best[0]:
                gang = tuple(sorted(room)[:n])
                best = (key, PreemptionPlan(worker.worker_id, gang, ask, tuple(chosen)))
    if best is not None:
        return best[1]
    what = job.gpu_model or "GPU"
    return Rejection(
        "preemption",
        f"{n} x {what}",
        str(most_room),
        True,
        f"no worker can free {n} matching GPUs by preempting: best frees {most_room}",
    )
