"""The filter step: which GPUs a job may run on, and why none when none (STYLE.md 2).

One set of predicates serves every consumer of the pipeline: a scheduling pass
(:class:`~broker.scheduler.FleetIndex`), the preemption step
(:func:`~broker.scheduler.preemption_plan`) and QuoteJob (``BrokerCore.quote``).

Static filters, in order, over homogeneous GPU groups (same model, VRAM, ask and whether
their workers run containers):

* ``container_runtime`` -- a worker with a container runtime, when the job has an image;
* ``gpu_model`` -- exact, when the job names one;
* ``min_vram`` -- VRAM >= the job's minimum;
* ``max_price`` -- ask <= the job's cap, when it sets one.

The first filter that leaves no group becomes the job's :class:`Rejection`
(never resolvable: no registered GPU could ever pass it). Survivors then meet the
``gpu_count`` filter (that many free GPUs of one group on one worker), whose
rejection :func:`count_rejection` words from group aggregates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from broker.scheduler.values import JobRequest, Rejection
from rigshift.units import format_usd as format_micros

__all__ = ["Group", "count_rejection", "passes", "static_filter"]


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


G = TypeVar("G", bound=Group)


def passes(
    job: JobRequest, model: str, vram_mb: int, price_micros: int, containers: bool = False
) -> bool:
    """True when a GPU of this model, VRAM and ask, on a worker that runs containers or not,
    passes every static filter of ``job``."""
    cap = job.max_price_micros_per_gpu_hour
    return (
        (containers or not job.containers)
        and (not job.gpu_model or model == job.gpu_model)
        and vram_mb >= job.min_vram_mb
        and (not cap or price_micros <= cap)
    )


def static_filter(
    groups: Sequence[G],
    model: str,
    min_vram: int,
    cap: int,
    containers: bool = False,
    workers: int = 0,
) -> tuple[list[G], Rejection | None]:
    """The groups that pass the static filters, in their given order, or the rejection of
    the first filter that left none (``workers``: how many workers the groups span, for the
    ``container_runtime`` message). An empty fleet yields ``([], None)``: there is nothing
    to filter, and the ``gpu_count`` filter explains."""
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
    return cheap, None


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
