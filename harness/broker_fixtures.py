"""Builders for test fixtures, with sensible defaults (like Kubernetes' ``st.MakeNode()``).

Only name what a test is about; everything else gets a default::

    worker = make_worker("w-a", model="RTX 3060", busy={0, 1})
    job = make_job("j1", gpu_count=2, max_price_micros_per_gpu_hour=300_000)
    result = place(make_snapshot([job], [worker]))
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from broker.scheduler import GpuSlot, JobRequest, Snapshot, WorkerCapacity
from rigshift.catalogue import vram_mb as catalogue_vram_mb
from rigshift.scoring import Measurement, reference

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRICE_MICROS",
    "healthy",
    "make_gpu",
    "make_job",
    "make_snapshot",
    "make_worker",
]

DEFAULT_MODEL = "RTX 3090"
DEFAULT_PRICE_MICROS = 250_000  # $0.25 per GPU-hour


def healthy(model: str = DEFAULT_MODEL, vram_mb: int = 0) -> Measurement:
    """Self-test figures of a healthy ``model``: its reference throughput, and all of
    ``vram_mb`` (or of the catalogue's VRAM for the model) usable. A GPU registered with
    them is VERIFIED, so jobs that do not set ``allow_unverified`` may run on it. A model
    without reference figures gets the RTX 3090's (and is UNVERIFIED all the same:
    ``rigshift.scoring.judge``)."""
    ref = reference(model) or reference(DEFAULT_MODEL)
    assert ref is not None
    usable = max(vram_mb, catalogue_vram_mb(model))
    return Measurement(ref.fp16_gflops, ref.fp32_gflops, usable, method="fixture")


def make_gpu(
    index: int = 0,
    model: str = DEFAULT_MODEL,
    *,
    vram_mb: int | None = None,
    price_micros_per_gpu_hour: int = DEFAULT_PRICE_MICROS,
    free: bool = True,
) -> GpuSlot:
    """One GPU; ``vram_mb`` defaults to the model's VRAM in ``rigshift.catalogue`` (16 GiB
    if unknown)."""
    vram = catalogue_vram_mb(model) if vram_mb is None else vram_mb
    return GpuSlot(index, model, vram, price_micros_per_gpu_hour, free)


def make_worker(
    worker_id: str = "w-0",
    *,
    gpu_count: int = 8,
    model: str = DEFAULT_MODEL,
    vram_mb: int | None = None,
    price_micros_per_gpu_hour: int = DEFAULT_PRICE_MICROS,
    busy: Collection[int] = (),
    gpus: Iterable[GpuSlot] | None = None,
    reliability_permille: int = 1000,
    environments: Collection[str] = (),
) -> WorkerCapacity:
    """A worker with ``gpu_count`` identical GPUs indexed 0.., those in ``busy`` taken.

    Pass ``gpus`` (e.g. built with :func:`make_gpu`) for a mixed rig; the other
    GPU arguments are then ignored.
    """
    if gpus is None:
        gpus = (
            make_gpu(
                i,
                model,
                vram_mb=vram_mb,
                price_micros_per_gpu_hour=price_micros_per_gpu_hour,
                free=i not in busy,
            )
            for i in range(gpu_count)
        )
    return WorkerCapacity(worker_id, tuple(gpus), reliability_permille, frozenset(environments))


def make_job(
    job_id: str = "j-0",
    gpu_count: int = 1,
    *,
    gpu_model: str = "",
    min_vram_mb: int = 0,
    max_price_micros_per_gpu_hour: int = 0,
    environment: str = "",
) -> JobRequest:
    """A pending job; by default one GPU of any model, any VRAM, any price, no environment."""
    return JobRequest(
        job_id, gpu_count, gpu_model, min_vram_mb, max_price_micros_per_gpu_hour, environment
    )


def make_snapshot(
    pending: Iterable[JobRequest] = (),
    workers: Iterable[WorkerCapacity] = (),
    *,
    now: float = 1_000.0,
) -> Snapshot:
    """A scheduler snapshot; ``pending`` is taken in the order given."""
    return Snapshot(now, tuple(pending), tuple(workers))
