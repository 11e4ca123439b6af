"""The index's groups (part of ``broker.scheduler.index``): the free capacity of one
homogeneous group across the fleet (:class:`FreeGroup`), and the groups that pass one job's
static filters within a pass (:class:`GroupFilter`)."""

from __future__ import annotations

from heapq import heappush

from broker.scheduler.filters import count_rejection, static_filter
from broker.scheduler.values import GroupSummary, JobRequest, Rejection

__all__ = [
    "FilterKey",
    "FreeGroup",
    "GroupFilter",
    "GroupKey",
    "RankKey",
    "gpu_count_rejection",
    "make_filter",
]

RankKey = tuple[int, str]  # a worker's rank, (-reliability_permille, worker_id): smallest preferred
# (model, vram, price, runs containers, verified, score, PCIe MB/s, RAM GB/GPU, CPU mcores/GPU)
GroupKey = tuple[str, int, int, bool, bool, int, int, int, int]
# (model, min vram, price cap, needs containers, allow unverified, min score, min PCIe MB/s,
#  min RAM GB/GPU, min CPU millicores/GPU)
FilterKey = tuple[str, int, int, bool, bool, int, int, int, int]


class FreeGroup:
    """Free capacity of one homogeneous group across the fleet: one model, VRAM and ask, on
    workers that run containers or not, with one verification, score, PCIe bandwidth, and
    host RAM and CPU per GPU (the figures ``GpuSlot`` and ``WorkerCapacity`` carry).

    Workers sit in buckets by how many GPUs of the group they have free; ``heaps[f]`` holds
    the rank keys of bucket ``f``, best first. Heaps are pruned lazily: an entry counts only
    while its worker still has exactly ``f`` free and the key is the worker's current one
    (``keys[worker_id] is key``). A heap is compacted when a push finds stale entries
    outnumbering live ones and cleared when its bucket empties, so it never holds more
    than about twice the most workers its bucket ever had.
    """

    __slots__ = (
        "by_total",
        "containers",
        "cpu",
        "free_gpus",
        "free_idx",
        "gpus",
        "heaps",
        "mask",
        "max_total",
        "model",
        "pcie",
        "price",
        "ram",
        "score",
        "sizes",
        "totals",
        "verified",
        "vram",
    )

    def __init__(
        self,
        model: str,
        vram: int,
        price: int,
        containers: bool = False,
        verified: bool = True,
        score: int = 0,
        pcie: int = 0,
        ram: int = 0,
        cpu: int = 0,
    ) -> None:
        self.model = model
        self.vram = vram
        self.price = price
        self.containers = containers  # its workers have a container runtime
        self.verified = verified
        self.score = score
        self.pcie = pcie  # host-to-device MB/s per GPU
        self.ram = ram  # host RAM per GPU of its workers, GiB
        self.cpu = cpu  # CPU millicores per GPU of its workers
        self.totals: dict[str, int] = {}  # worker id -> its GPUs (busy or free) of this group
        self.by_total: dict[int, int] = {}  # such a total -> workers with it
        self.max_total = 0  # most GPUs (busy or free) of this group on one worker
        self.free_idx: dict[str, list[int]] = {}  # worker id -> free GPU indices, ascending
        self.sizes: list[int] = [0]  # sizes[f] = number of workers with exactly f free
        self.heaps: list[list[RankKey]] = [[]]  # heaps[f] = rank keys, lazily pruned
        self.mask = 0  # bit f set <=> sizes[f] > 0
        self.gpus = 0  # GPUs of this group, busy or free, on all its workers
        self.free_gpus = 0  # of which free

    @property
    def key(self) -> GroupKey:
        """Its key in the index."""
        return (
            self.model,
            self.vram,
            self.price,
            self.containers,
            self.verified,
            self.score,
            self.pcie,
            self.ram,
            self.cpu,
        )

    def summary(self) -> GroupSummary:
        """What QuoteJob shows of it."""
        return GroupSummary(
            self.model,
            self.vram,
            self.price,
            self.gpus,
            self.free_gpus,
            self.containers,
            self.verified,
            self.score,
            self.pcie,
            self.ram,
            self.cpu,
        )

    def best_free(self) -> int:
        """Most free GPUs of this group on one worker."""
        return max(self.mask.bit_length() - 1, 0)

    def add(
        self, key: RankKey, total: int, free: list[int] | None, keys: dict[str, RankKey]
    ) -> None:
        """Count a worker with ``total`` GPUs of this group, ``free`` (ascending) of them free."""
        self.totals[key[1]] = total
        self.gpus += total
        self.by_total[total] = self.by_total.get(total, 0) + 1
        if total > self.max_total:
            extra = total + 1 - len(self.sizes)
            if extra > 0:
                self.sizes += [0] * extra
                self.heaps += [[] for _ in range(extra)]
            self.max_total = total
        if free:
            self.free_idx[key[1]] = free
            self.free_gpus += len(free)
            self.enter(key, len(free), keys)

    def remove(self, worker_id: str) -> bool:
        """Forget a worker; True when no worker has a GPU of this group any more."""
        total = self.totals.pop(worker_id)
        self.gpus -= total
        left = self.by_total[total] - 1
        if left:
            self.by_total[total] = left
        else:
            del self.by_total[total]
            if total == self.max_total:
                self.max_total = max(self.by_total, default=0)
        free = self.free_idx.pop(worker_id, None)
        if free is not None:
            self.free_gpus -= len(free)
            self.leave(len(free))
        return not self.totals

    def enter(self, key: RankKey, f: int, keys: dict[str, RankKey]) -> None:
        """Put a worker into bucket ``f`` (its free list must already have ``f`` entries)."""
        self.sizes[f] += 1
        self.mask |= 1 << f
        heap = self.heaps[f]
        heappush(heap, key)
        if len(heap) > 2 * self.sizes[f] + 8:
            heap[:] = sorted({k for k in heap if self.live(k, f, keys)})

    def leave(self, f: int) -> None:
        """Take a worker out of bucket ``f``; its heap entry goes stale."""
        self.sizes[f] -= 1
        if not self.sizes[f]:
            self.mask &= ~(1 << f)
            self.heaps[f].clear()  # every entry left is stale

    def live(self, key: RankKey, f: int, keys: dict[str, RankKey]) -> bool:
        """True when ``key`` is a current entry of bucket ``f``."""
        free = self.free_idx.get(key[1])
        return free is not None and len(free) == f and keys.get(key[1]) is key


class GroupFilter:
    """Groups that pass one job's static filters, cheapest first, plus caches."""

    __slots__ = (
        "any_group",
        "fail_at",
        "group_ids",
        "groups",
        "links",
        "max_total",
        "narrow",
        "reasons",
        "static",
        "wide",
    )

    def __init__(self, groups: list[FreeGroup], static: Rejection | None) -> None:
        self.groups = groups
        # the groups differ in link bandwidth: the topology score can tell them apart
        self.links = len({g.pcie for g in groups}) > 1
        self.any_group = bool(groups)  # before drop() forgets the groups that filled up
        self.group_ids = {id(g) for g in groups}
        self.static = static
        self.max_total = max((g.max_total for g in groups), default=0)
        # Smallest gang size known to fail this pass; free capacity only shrinks.
        self.fail_at = 0 if static is not None else self.max_total + 1
        self.reasons: dict[int, tuple[int, tuple[Rejection, ...]]] = {}  # n -> (version, reasons)
        self.wide: list[FreeGroup] | None = None  # cheapest first, then widest link first
        self.narrow: list[FreeGroup] | None = None  # cheapest first, then narrowest link first

    def drop(self, dead: list[FreeGroup]) -> None:
        """Forget groups with no free GPU left: within a pass GPUs are only taken, so they
        can never fit again, and a walk over the groups need not meet them (their
        ``max_total`` stays counted)."""
        gone = {id(g) for g in dead}
        self.groups = [g for g in self.groups if id(g) not in gone]
        if self.wide is not None:
            self.wide = [g for g in self.wide if id(g) not in gone]
        if self.narrow is not None:
            self.narrow = [g for g in self.narrow if id(g) not in gone]

    def by_links(self, wide: bool) -> list[FreeGroup]:
        """The groups cheapest first, then in the order a job preferring wide (or narrow)
        links ranks them; ties keep the groups' order."""
        if wide:
            if self.wide is None:
                self.wide = sorted(self.groups, key=lambda g: (g.price, -g.pcie))
            return self.wide
        if self.narrow is None:
            self.narrow = sorted(self.groups, key=lambda g: (g.price, g.pcie))
        return self.narrow


def make_filter(groups: list[FreeGroup], fkey: FilterKey, workers: int) -> GroupFilter:
    """The static filters (``broker.scheduler.filters``) over the index's groups."""
    survivors, rejection = static_filter(groups, *fkey, workers=workers)
    return GroupFilter(survivors, rejection)


def gpu_count_rejection(job: JobRequest, filt: GroupFilter) -> Rejection:
    """The gpu_count rejection from group aggregates (never a rescan of workers)."""
    best = max((g.best_free() for g in filt.groups), default=0)
    return count_rejection(job, best, filt.max_total, filt.any_group)
