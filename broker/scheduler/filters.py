"""The filter step: which GPUs a job may run on, and why none when none (STYLE.md 2).

One set of predicates serves every consumer of the pipeline: a scheduling pass
(:class:`~broker.scheduler.FleetIndex`), the preemption step
(:func:`~broker.scheduler.preemption_plan`) and QuoteJob (``BrokerCore.quote``).

Static filters, in order, over homogeneous GPU groups (same model, VRAM, ask, whether
their workers run containers, verification, score, PCIe bandwidth, RAM and CPU per GPU):

* ``container_runtime`` -- a worker with a container runtime, when the job has an image;
* ``gpu_model`` -- exact, when the job names one;
* ``min_vram`` -- VRAM >= the job's minimum;
* ``max_price`` -- ask <= the job's cap, when it sets one;
* ``verification`` -- a VERIFIED GPU, unless the job sets ``allow_unverified``;
* ``min_score`` -- the GPU's score (floored to ``SCORE_STEP``) >= the job's minimum;
* ``min_pcie`` -- the GPU's host-to-device MB/s (floored to ``PCIE_STEP_MBPS``) >= the
  job's minimum;
* ``min_host_ram_per_gpu`` -- the rig's host RAM per GPU (whole GiB) >= the minimum;
* ``min_cpu_per_gpu`` -- the rig's CPU millicores per GPU >= the minimum.

The first filter that leaves no group becomes the job's :class:`Rejection`
(never resolvable: no registered GPU could ever pass it). Survivors then meet the
``gpu_count`` filter (that many free GPUs of one group on one worker), whose
rejection :func:`count_rejection` words from group aggregates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from broker.scheduler.values import GpuSlot, JobRequest, Rejection, WorkerCapacity
from rigshift.units import format_usd as format_micros

__all__ = [
    "STAGES",
    "Group",
    "cores",
    "count_rejection",
    "gbps",
    "passes",
    "passes_stages",
    "static_filter",
]

STAGES: dict[str, int] = {
    "container_runtime": 0,
    "gpu_model": 1,
    "min_vram": 2,
    "max_price": 3,
    "verification": 4,
    "min_score": 5,
    "min_pcie": 6,
    "min_host_ram_per_gpu": 7,
    "min_cpu_per_gpu": 8,
    "gpu_count": 9,
}
"""The static filters in the order :func:`static_filter` applies them, by the ``resource``
of their rejection: a job rejected by the filter of stage ``s`` depends only on the groups
that pass stages ``0 .. s-1`` (:func:`passes_stages`); ``gpu_count`` comes after them all."""


class Group(Protocol):
    """A homogeneous GPU group as the filters see it."""

    @property
    def model(self) -> str: ...

    @property
    def vram(self) -> int: ...

    @property
    def price(self) -> int: ...

    @property
    def containers(self) -> bool: ...

    @property
    def verified(self) -> bool: ...

    @property
    def score(self) -> int: ...

    @property
    def pcie(self) -> int: ...

    @property
    def ram(self) -> int: ...

    @property
    def cpu(self) -> int: ...

    @property
    def gpus(self) -> int: ...


G = TypeVar("G", bound=Group)


def passes(job: JobRequest, gpu: GpuSlot, worker: WorkerCapacity) -> bool:
    """True when ``gpu`` of ``worker`` passes every static filter of ``job``."""
    cap = job.max_price_micros_per_gpu_hour
    return (
        (worker.containers or not job.containers)
        and (not job.gpu_model or gpu.model == job.gpu_model)
        and gpu.vram_mb >= job.min_vram_mb
        and (not cap or gpu.price_micros_per_gpu_hour <= cap)
        and (gpu.verified or job.allow_unverified)
        and gpu.score >= job.min_score
        and gpu.pcie_mbps >= job.min_pcie_mbps
        and worker.ram_gb_per_gpu >= job.min_ram_gb_per_gpu
        and worker.cpu_millicores_per_gpu >= job.min_cpu_millicores_per_gpu
    )


def gbps(mbps: int, hint: bool = False) -> str:
    """MB/s as GB/s, e.g. ``0.9`` or ``12``; with ``hint`` a link slower than 2 GB/s is
    named an x1 riser (a mining riser: one PCIe lane)."""
    text = f"{mbps / 1000:.1f}".removesuffix(".0")
    return f"{text} (x1 riser)" if hint and 0 < mbps < 2000 else text


def cores(millicores: int) -> str:
    """Thousandths of a core as cores, e.g. ``1.5`` or ``2``."""
    return f"{millicores / 1000:.3f}".rstrip("0").rstrip(".")


def _gangs(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def static_filter(
    groups: Sequence[G],
    model: str,
    min_vram: int,
    cap: int,
    containers: bool = False,
    allow_unverified: bool = True,
    min_score: int = 0,
    min_pcie: int = 0,
    min_ram: int = 0,
    min_cpu: int = 0,
    *,
    workers: int = 0,
    gpu_count: int = 1,
) -> tuple[list[G], Rejection | None]:
    """The groups that pass the static filters, in their given order, or the rejection of
    the first filter that left none (``workers``: how many workers the groups span, for the
    ``container_runtime`` message; ``gpu_count``: the gang, for the topology messages). An
    empty fleet yields ``([], None)``: there is nothing to filter, and the ``gpu_count``
    filter explains."""
    if not groups:
        return [], None
    if containers:
        groups = [g for g in groups if g.containers]
        if not groups:
            message = f"no worker runs containers: 0 of {workers} have a container runtime"
            return [], Rejection("container_runtime", "a container runtime", "0", False, message)
    what = model or "GPU"
    matching = [g for g in groups if not model or g.model == model]
    if not matching:
        fleet = ", ".join(sorted({g.model for g in groups}))
        message = f"no GPU of model {model} is registered (fleet has {fleet})"
        return [], Rejection("gpu_model", model, fleet, False, message)
    roomy = [g for g in matching if g.vram >= min_vram]
    if not roomy:
        largest = max(g.vram for g in matching)
        message = f"no {what} has {min_vram} MB VRAM or more (largest has {largest} MB)"
        return [], Rejection("min_vram", f"{min_vram} MB", f"{largest} MB", False, message)
    cheap = [g for g in roomy if not cap or g.price <= cap]
    if not cheap:
        ask = format_micros(min(g.price for g in roomy))
        limit = format_micros(cap)
        message = f"cheapest matching GPU asks {ask}/GPU-hour, above the cap {limit}"
        return [], Rejection("max_price", f"{limit}/GPU-hour", f"{ask}/GPU-hour", False, message)
    if allow_unverified and not (min_score or min_pcie or min_ram or min_cpu):
        return cheap, None  # the common case: no topology or verification filter
    return _topology_filter(
        cheap, what, allow_unverified, min_score, min_pcie, min_ram, min_cpu, gpu_count
    )


def _topology_filter(
    groups: list[G],
    what: str,
    allow_unverified: bool,
    min_score: int,
    min_pcie: int,
    min_ram: int,
    min_cpu: int,
    n: int,
) -> tuple[list[G], Rejection | None]:
    """The ``verification``, ``min_score``, ``min_pcie``, ``min_host_ram_per_gpu`` and
    ``min_cpu_per_gpu`` filters, in that order (see :func:`static_filter`)."""
    if not allow_unverified:
        verified = [g for g in groups if g.verified]
        if not verified:
            unverified = sum(g.gpus for g in groups)
            message = f"no verified {what}: {unverified} unverified (use --allow-unverified)"
            return [], Rejection(
                "verification", "VERIFIED", f"{unverified} unverified", False, message
            )
        groups = verified
    if min_score:
        scored = [g for g in groups if g.score >= min_score]
        if not scored:
            best = max(g.score for g in groups)
            message = f"no {what} scores {min_score} or more: best scores {best}"
            return [], Rejection("min_score", str(min_score), str(best), False, message)
        groups = scored
    if min_pcie:
        wide = [g for g in groups if g.pcie >= min_pcie]
        if not wide:
            best = max(g.pcie for g in groups)
            message = (
                f"no worker has {_gangs(n)} with >= {gbps(min_pcie)} GB/s PCIe: "
                f"best has {gbps(best, hint=True)}"
            )
            requested = f"{gbps(min_pcie)} GB/s"
            return [], Rejection("min_pcie", requested, f"{gbps(best)} GB/s", False, message)
        groups = wide
    if min_ram:
        roomy = [g for g in groups if g.ram >= min_ram]
        if not roomy:
            best = max(g.ram for g in groups)
            message = (
                f"no worker has {_gangs(n)} with >= {min_ram} GB host RAM per GPU: best has {best}"
            )
            return [], Rejection(
                "min_host_ram_per_gpu", f"{min_ram} GB", f"{best} GB", False, message
            )
        groups = roomy
    if min_cpu:
        busy = [g for g in groups if g.cpu >= min_cpu]
        if not busy:
            best = max(g.cpu for g in groups)
            message = (
                f"no worker has {_gangs(n)} with >= {cores(min_cpu)} CPU cores per GPU: "
                f"best has {cores(best)}"
            )
            return [], Rejection("min_cpu_per_gpu", cores(min_cpu), cores(best), False, message)
        groups = busy
    return groups, None


def count_rejection(job: JobRequest, best_free: int, max_total: int, any_group: bool) -> Rejection:
    """The ``gpu_count`` rejection: ``best_free`` is the most free GPUs of one surviving group
    on one worker, ``max_total`` the most such GPUs (busy or free) on one worker, and
    ``any_group`` whether any group survived the static filters. Resolvable when some worker
    has enough GPUs in total, i.e. when waiting may help."""
    n = job.gpu_count
    what = job.gpu_model or ("GPU" if n == 1 else "GPUs")
    qualifiers = []
    if job.min_vram_mb:
        qualifiers.append(f">= {job.min_vram_mb} MB")
    if job.max_price_micros_per_gpu_hour:
        qualifiers.append(f"<= {format_micros(job.max_price_micros_per_gpu_hour)}/GPU-hour")
    if job.min_score:
        qualifiers.append(f"score >= {job.min_score}")
    if job.min_pcie_mbps:
        qualifiers.append(f">= {gbps(job.min_pcie_mbps)} GB/s PCIe")
    if job.min_ram_gb_per_gpu:
        qualifiers.append(f">= {job.min_ram_gb_per_gpu} GB RAM/GPU")
    if job.min_cpu_millicores_per_gpu:
        qualifiers.append(f">= {cores(job.min_cpu_millicores_per_gpu)} cores/GPU")
    if qualifiers:
        what += f" ({', '.join(qualifiers)})"
    if n < 1:
        message = f"gpu_count must be >= 1, got {n}"
        return Rejection("gpu_count", str(n), str(best_free), False, message)
    message = f"no worker has {n} free {what}: best has {best_free}"
    resolvable = n <= max_total
    if not any_group:
        message = f"no worker has {n} free {what}: the fleet has no GPUs"
    elif not resolvable:
        message += f", and none has more than {max_total} in total"
    requested = f"{n} x {job.gpu_model or 'GPU'}"
    return Rejection("gpu_count", requested, str(best_free), resolvable, message)


def passes_stages(
    group: tuple[str, int, int, bool, bool, int, int, int, int],
    fkey: tuple[str, int, int, bool, bool, int, int, int, int],
    stages: int,
) -> bool:
    """True when a group (its index key: model, VRAM, ask, containers, verified, score, PCIe
    MB/s, RAM GB and CPU millicores per GPU) passes the first ``stages`` static filters
    (:data:`STAGES`) of a job whose filter key is ``fkey`` (model, min VRAM, price cap,
    needs containers, allow unverified, min score, min PCIe, min RAM, min CPU)."""
    model, vram, price, containers, verified, score, pcie, ram, cpu = group
    f_model, f_vram, cap, f_containers, unverified, f_score, f_pcie, f_ram, f_cpu = fkey
    checks = (
        containers or not f_containers,
        not f_model or model == f_model,
        vram >= f_vram,
        not cap or price <= cap,
        verified or unverified,
        score >= f_score,
        pcie >= f_pcie,
        ram >= f_ram,
        cpu >= f_cpu,
    )
    return all(checks[:stages])
