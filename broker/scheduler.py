"""The pure scheduler: which pending job runs on which GPUs of which worker.

``place(snapshot)`` runs one pass in three steps, in the style of Kubernetes'
scheduling framework:

1. **filter** — a job's gang of ``gpu_count`` GPUs must come from ONE worker and
   ONE homogeneous group (same model, VRAM and ask price). Filters, in order:
   ``gpu_model`` (exact, when set), ``min_vram`` (VRAM >= the minimum), ``max_price``
   (ask <= cap, when a cap is set) and ``gpu_count`` (that many free GPUs of the
   group on one worker). A job nothing survives for gets one :class:`Rejection`
   naming the first filter that eliminated everything.
2. **score** — among the survivors the choice is the smallest
   :func:`choice_key`: ``(price, leftover, worker_id, vram_mb, model)``, i.e.
   cheapest first, then best fit (fewest free GPUs left in that worker's group
   after placing), then lowest ``worker_id``; the last two only break ties
   between groups of one worker. The gang takes the lowest free indices.
3. **bind** — the caller's job. This module does no I/O and reads no clock; the
   same snapshot always gives the same result.

Jobs are taken in the snapshot's order (the caller sorts by priority, FIFO).
Greedy with backfill: a job that does not fit is skipped and later, smaller
jobs may still be placed.

Cost per job does not depend on the fleet size. Free capacity is indexed per
group as buckets of workers by free count (a bitmask says which buckets are
non-empty, a heap per bucket yields the lowest worker_id). Within one pass GPUs
only ever get taken, never freed, so once a shape fails for some filters, every
job with the same filters and at least as many GPUs fails too; that is cached.
Reasons come from group aggregates, never from a rescan of the workers.

Money is integer micro-dollars throughout (STYLE.md item 10).
"""

from __future__ import annotations

from dataclasses import dataclass
from heapq import heappop, heappush

__all__ = [
    "GpuSlot",
    "JobRequest",
    "Placement",
    "Rejection",
    "SchedulingResult",
    "Snapshot",
    "Unplaced",
    "WorkerCapacity",
    "best_fit_leftover",
    "choice_key",
    "format_micros",
    "place",
]


@dataclass(frozen=True, slots=True)
class GpuSlot:
    """One GPU of a worker as the scheduler sees it."""

    index: int
    model: str
    vram_mb: int
    price_micros_per_gpu_hour: int
    free: bool


@dataclass(frozen=True, slots=True)
class WorkerCapacity:
    """All GPUs of one online worker; busy ones have ``free=False``."""

    worker_id: str
    gpus: tuple[GpuSlot, ...]
    reliability_permille: int = 1000  # recent uptime x attempt success; higher is preferred


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A pending job. Empty or zero fields mean "any"."""

    job_id: str
    gpu_count: int
    gpu_model: str = ""
    min_vram_mb: int = 0
    max_price_micros_per_gpu_hour: int = 0


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
    """Why a filter eliminated every GPU for a job.

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


# --- scores ------------------------------------------------------------------------------------


def best_fit_leftover(free_in_group: int, gpu_count: int) -> int:
    """Free GPUs left in the worker's group after placing; lower packs tighter."""
    return free_in_group - gpu_count


def choice_key(
    price_micros: int,
    free_in_group: int,
    gpu_count: int,
    worker_id: str,
    vram_mb: int,
    model: str,
    reliability_permille: int = 1000,
) -> tuple[int, int, int, str, int, str]:
    """Total order over candidate (worker, group) pairs; the smallest wins:
    cheapest, then tightest fit, then most reliable worker, then worker id."""
    leftover = best_fit_leftover(free_in_group, gpu_count)
    return (price_micros, leftover, -reliability_permille, worker_id, vram_mb, model)


def format_micros(micros: int) -> str:
    """``250000`` -> ``"$0.250000"``, by integer arithmetic only."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}${whole}.{frac:06d}"


# --- index -------------------------------------------------------------------------------------


class _Group:
    """Free capacity of one homogeneous (model, vram, price) group across the fleet."""

    __slots__ = ("free_idx", "heaps", "mask", "max_total", "model", "price", "sizes", "vram")

    def __init__(self, model: str, vram: int, price: int) -> None:
        self.model = model
        self.vram = vram
        self.price = price
        self.max_total = 0  # most GPUs (busy or free) of this group on one worker
        self.free_idx: dict[int, list[int]] = {}  # worker rank -> free GPU indices, ascending
        self.sizes: list[int] = []  # sizes[f] = number of workers with exactly f free
        self.heaps: list[list[int]] = []  # heaps[f] = worker ranks, lazily pruned
        self.mask = 0  # bit f set <=> sizes[f] > 0

    def best_free(self) -> int:
        """Most free GPUs of this group on one worker."""
        return max(self.mask.bit_length() - 1, 0)


class _Filter:
    """Groups that pass one job's model/vram/price filters, cheapest first, plus caches."""

    __slots__ = ("fail_at", "groups", "max_total", "reasons", "static")

    def __init__(self, groups: list[_Group], static: Rejection | None) -> None:
        self.groups = groups
        self.static = static
        self.max_total = max((g.max_total for g in groups), default=0)
        # Smallest gang size known to fail this pass; free capacity only shrinks.
        self.fail_at = 0 if static is not None else self.max_total + 1
        self.reasons: dict[int, tuple[int, tuple[Rejection, ...]]] = {}  # n -> (version, reasons)


def _build_groups(
    workers: tuple[WorkerCapacity, ...],
) -> tuple[list[str], list[int], list[_Group]]:
    """Index the fleet; returns worker ids and reliabilities in rank order (most reliable
    first, then by id, so a bucket's heap top is the preferred worker) and the groups."""
    ordered = sorted(workers, key=lambda w: (-w.reliability_permille, w.worker_id))
    ids = [w.worker_id for w in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate worker_id in snapshot")
    groups: dict[tuple[str, int, int], _Group] = {}
    for rank, worker in enumerate(ordered):
        if len({gpu.index for gpu in worker.gpus}) != len(worker.gpus):
            raise ValueError(f"duplicate GPU index on worker {worker.worker_id}")
        totals: dict[_Group, int] = {}
        for gpu in worker.gpus:
            key = (gpu.model, gpu.vram_mb, gpu.price_micros_per_gpu_hour)
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(*key)
            totals[group] = totals.get(group, 0) + 1
            if gpu.free:
                free = group.free_idx.get(rank)
                if free is None:
                    group.free_idx[rank] = [gpu.index]
                else:
                    free.append(gpu.index)
        for group, total in totals.items():
            group.max_total = max(group.max_total, total)
    for group in groups.values():
        group.sizes = [0] * (group.max_total + 1)
        group.heaps = [[] for _ in range(group.max_total + 1)]
        for rank, free in group.free_idx.items():  # ranks ascend, so every heap stays sorted
            free.sort()
            group.sizes[len(free)] += 1
            group.heaps[len(free)].append(rank)
            group.mask |= 1 << len(free)
    reliability = [w.reliability_permille for w in ordered]
    return ids, reliability, sorted(groups.values(), key=lambda g: (g.price, g.vram, g.model))


def _make_filter(groups: list[_Group], model: str, min_vram: int, cap: int) -> _Filter:
    """Apply the static filters in order model -> vram -> price; the first to empty the set
    becomes the rejection."""
    if not groups:  # empty fleet: nothing to filter; the count filter explains
        return _Filter([], None)
    what = model or "GPU"
    matching = [g for g in groups if not model or g.model == model]
    if not matching:
        fleet = ", ".join(sorted({g.model for g in groups}))
        rejection = Rejection(
            "gpu_model",
            model,
            fleet,
            False,
            f"no GPU of model {model} is registered (fleet has {fleet})",
        )
        return _Filter([], rejection)
    roomy = [g for g in matching if g.vram >= min_vram]
    if not roomy:
        largest = max(g.vram for g in matching)
        rejection = Rejection(
            "min_vram",
            f"{min_vram} MB",
            f"{largest} MB",
            False,
            f"no {what} has {min_vram} MB VRAM or more (largest has {largest} MB)",
        )
        return _Filter([], rejection)
    cheap = [g for g in roomy if not cap or g.price <= cap]
    if not cheap:
        ask = format_micros(min(g.price for g in roomy))
        rejection = Rejection(
            "max_price",
            f"{format_micros(cap)}/GPU-hour",
            f"{ask}/GPU-hour",
            False,
            f"cheapest matching GPU asks {ask}/GPU-hour, above the cap {format_micros(cap)}",
        )
        return _Filter([], rejection)
    return _Filter(cheap, None)


def _count_rejection(job: JobRequest, filt: _Filter) -> Rejection:
    """The gpu_count rejection from group aggregates (never a rescan of workers)."""
    n = job.gpu_count
    what = job.gpu_model or ("GPU" if n == 1 else "GPUs")
    qualifiers = []
    if job.min_vram_mb:
        qualifiers.append(f">= {job.min_vram_mb} MB")
    if job.max_price_micros_per_gpu_hour:
        qualifiers.append(f"<= {format_micros(job.max_price_micros_per_gpu_hour)}/GPU-hour")
    if qualifiers:
        what += f" ({', '.join(qualifiers)})"
    best = max((g.best_free() for g in filt.groups), default=0)
    if n < 1:
        return Rejection("gpu_count", str(n), str(best), False, f"gpu_count must be >= 1, got {n}")
    message = f"no worker has {n} free {what}: best has {best}"
    resolvable = n <= filt.max_total
    if not filt.groups:
        message = f"no worker has {n} free {what}: the fleet has no GPUs"
    elif not resolvable:
        message += f", and none has more than {filt.max_total} in total"
    return Rejection("gpu_count", f"{n} x {job.gpu_model or 'GPU'}", str(best), resolvable, message)


# --- the pass ----------------------------------------------------------------------------------


def _take(
    filt: _Filter, n: int, ids: list[str], rel: list[int]
) -> tuple[_Group, int, tuple[int, ...]] | None:
    """Choose by :func:`choice_key` among the qualifying groups and take the gang from the
    index; returns (group, worker rank, GPU indices) or None if no worker has ``n`` free."""
    best: _Group | None = None
    best_key: tuple[int, int, int, str, int, str] | None = None
    best_free = 0
    for group in filt.groups:  # cheapest first
        if best_key is not None and group.price > best_key[0]:
            break
        fits = group.mask >> n
        if not fits:
            continue
        free = n + (fits & -fits).bit_length() - 1  # smallest bucket >= n: best fit
        heap = group.heaps[free]
        free_idx = group.free_idx
        while len(free_idx[heap[0]]) != free:  # drop workers that have moved down since
            heappop(heap)
        top = heap[0]
        key = choice_key(group.price, free, n, ids[top], group.vram, group.model, rel[top])
        if best_key is None or key < best_key:
            best, best_key, best_free = group, key, free
    if best is None:
        return None
    rank = heappop(best.heaps[best_free])
    free_list = best.free_idx[rank]
    taken = tuple(free_list[:n])
    del free_list[:n]
    best.sizes[best_free] -= 1
    if not best.sizes[best_free]:
        best.mask &= ~(1 << best_free)
    left = best_free - n
    if left:
        best.sizes[left] += 1
        best.mask |= 1 << left
        heappush(best.heaps[left], rank)
    return best, rank, taken


def place(snapshot: Snapshot) -> SchedulingResult:
    """Place the pending jobs of ``snapshot`` greedily in order; pure and deterministic.

    Raises ValueError if the snapshot repeats a worker_id or a GPU index on one worker.
    """
    ids, rel, groups = _build_groups(snapshot.workers)
    filters: dict[tuple[str, int, int], _Filter] = {}
    placements: list[Placement] = []
    unplaced: list[Unplaced] = []
    version = 0  # placements so far; cached count reasons are valid while it is unchanged

    for job in snapshot.pending:
        n = job.gpu_count
        fkey = (job.gpu_model, job.min_vram_mb, job.max_price_micros_per_gpu_hour)
        filt = filters.get(fkey)
        if filt is None:
            filt = filters[fkey] = _make_filter(groups, *fkey)
        if 0 < n < filt.fail_at:
            took = _take(filt, n, ids, rel)
            if took is not None:
                group, rank, taken = took
                placements.append(Placement(job.job_id, ids[rank], taken, group.price))
                version += 1
                continue
            filt.fail_at = n  # and every larger gang with these filters, for the rest of the pass
        cached = filt.reasons.get(n)
        if cached is None or (cached[0] != version and filt.static is None):
            reason = filt.static if filt.static is not None else _count_rejection(job, filt)
            cached = filt.reasons[n] = (version, (reason,))
        unplaced.append(Unplaced(job.job_id, cached[1]))

    return SchedulingResult(tuple(placements), tuple(unplaced))
