"""The free-capacity index behind every scheduling pass: :class:`FleetIndex` and :func:`place`.

Cost per job does not depend on the fleet size. Free capacity is indexed per
group as buckets of workers by free count (a bitmask says which buckets are
non-empty, a heap per bucket yields the best-ranked worker). Within one pass GPUs
only ever get taken, never freed, so once a shape fails for some filters, every
job with the same filters and at least as many GPUs fails too; that is cached.
Reasons come from group aggregates, never from a rescan of the workers.

``place(snapshot)`` builds that index from the snapshot, O(GPUs) per pass.
:class:`FleetIndex` is the same index kept between passes and updated one worker
at a time; ``index.place(pending)`` gives what ``place()`` would give on a snapshot
of the same workers. The broker core keeps one, so a pass costs what changed, and
QuoteJob reads it (:meth:`FleetIndex.probe`, :meth:`FleetIndex.matching`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from heapq import heappop

from broker.scheduler.filters import static_filter
from broker.scheduler.groups import (
    FilterKey,
    FreeGroup,
    GroupFilter,
    GroupKey,
    RankKey,
    gpu_count_rejection,
    make_filter,
)
from broker.scheduler.scores import ChoiceKey, choice_key
from broker.scheduler.values import (
    GroupSummary,
    JobRequest,
    Placement,
    Rejection,
    SchedulingResult,
    Snapshot,
    Unplaced,
    WorkerCapacity,
)

__all__ = ["FleetIndex", "GroupSummary", "place"]


# --- the pass ----------------------------------------------------------------------------------


class FleetIndex:
    """The free-capacity index of :func:`place`, kept between passes.

    :func:`place` builds one from its snapshot every pass, which costs O(GPUs). A caller that
    runs many passes over a fleet that changes a little between them (``BrokerCore``) keeps
    one instead: :meth:`update` a worker whenever the :class:`WorkerCapacity` it would show
    the scheduler changes (GPUs taken or freed, reliability, prices, registration),
    :meth:`remove` it when it leaves the snapshot (offline, draining), and call
    :meth:`place` with the pending jobs. ``index.place(pending)`` returns exactly what
    ``place(Snapshot(now, pending, workers))`` returns for the workers the index was told
    about. An update costs O(GPUs of that worker x log workers); a pass costs O(jobs) plus
    O(groups) per distinct filter, whatever the fleet's size.

    :meth:`place` takes the GPUs it places out of the index, so afterwards the index shows
    the fleet with those placements bound. Updating the bound workers with their new
    capacity, as the core does, leaves it unchanged.
    """

    __slots__ = (
        "_envs_of",
        "_freed",
        "_groups",
        "_holders",
        "_keys",
        "_member_of",
        "_order",
        "_reshaped",
        "_track",
    )

    def __init__(self, workers: Iterable[WorkerCapacity] = (), *, track: bool = True) -> None:
        """Index ``workers``. Raises ValueError if a worker_id or a worker's GPU index repeats.

        ``track``: record which groups changed upward or in shape (:meth:`drain_changes`)."""
        self._track = track
        # Since the last drain_changes(): groups where some worker gained free GPUs (its
        # GPUs of the group unchanged), and groups whose GPU counts per worker changed
        # (a worker joined or left the group, or its GPUs in the group changed; created
        # and deleted groups too).
        self._freed: set[GroupKey] = set()
        self._reshaped: set[GroupKey] = set()
        self._groups: dict[GroupKey, FreeGroup] = {}
        self._keys: dict[str, RankKey] = {}  # worker id -> rank key, the object heaps hold
        self._member_of: dict[str, tuple[FreeGroup, ...]] = {}  # worker id -> groups it is in
        self._order: list[FreeGroup] | None = None  # groups cheapest first; None after a change
        self._holders: dict[str, set[str]] = {}  # environment -> workers holding it
        self._envs_of: dict[str, frozenset[str]] = {}  # worker id -> its environments
        # In rank order every heap push lands at the end of its heap: no sifting.
        for worker in sorted(workers, key=lambda w: (-w.reliability_permille, w.worker_id)):
            if worker.worker_id in self._keys:
                raise ValueError("duplicate worker_id in snapshot")
            self.update(worker)

    def drain_changes(self) -> tuple[set[GroupKey], set[GroupKey]]:
        """``(freed, reshaped)`` since the last call, and forget them: the keys of groups in
        which some worker gained free GPUs (and nothing else changed), and of groups whose
        GPUs per worker changed (created and deleted groups too). Placement takes GPUs
        without recording anything: only what could let a job fit, or change why it does
        not, is recorded."""
        out = (self._freed, self._reshaped)
        self._freed, self._reshaped = set(), set()
        return out

    def best_free(self, key: GroupKey) -> int:
        """Most free GPUs of the group ``key`` on one worker (0 when there is no such group)."""
        group = self._groups.get(key)
        return group.best_free() if group is not None else 0

    def gangs_free(self, key: GroupKey, n: int) -> int:
        """How many gangs of ``n`` the free GPUs of the group ``key`` make, a gang on one
        worker: the most jobs of ``n`` GPUs it can take now (0 when there is no such group)."""
        group = self._groups.get(key)
        if group is None or n < 1:
            return 0
        sizes = group.sizes
        return sum(sizes[f] * (f // n) for f in range(n, len(sizes)))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._keys

    def update(self, worker: WorkerCapacity) -> None:
        """Add a worker, or replace what the index knows of it."""
        wid = worker.worker_id
        if len({gpu.index for gpu in worker.gpus}) != len(worker.gpus):
            raise ValueError(f"duplicate GPU index on worker {wid}")
        before = self._forget(wid)
        totals: dict[GroupKey, int] = {}
        free: dict[GroupKey, list[int]] = {}
        containers = worker.containers
        ram = worker.ram_gb_per_gpu
        cpu = worker.cpu_millicores_per_gpu
        for gpu in worker.gpus:
            gkey = (
                gpu.model,
                gpu.vram_mb,
                gpu.price_micros_per_gpu_hour,
                containers,
                gpu.verified,
                gpu.score,
                gpu.pcie_mbps,
                ram,
                cpu,
            )
            totals[gkey] = totals.get(gkey, 0) + 1
            if gpu.free:
                indices = free.get(gkey)
                if indices is None:
                    free[gkey] = [gpu.index]
                else:
                    indices.append(gpu.index)
        key = self._keys[wid] = (-worker.reliability_permille, wid)
        member = []
        for gkey, total in totals.items():
            group = self._groups.get(gkey)
            if group is None:
                group = self._groups[gkey] = FreeGroup(*gkey)
                self._order = None
            indices = free.get(gkey)
            if indices is not None:
                indices.sort()
            group.add(key, total, indices, self._keys)
            member.append(group)
        self._member_of[wid] = tuple(member)
        if worker.environments:
            self._envs_of[wid] = worker.environments
            for env in worker.environments:
                self._holders.setdefault(env, set()).add(wid)
        if self._track:
            for gkey, total in totals.items():
                was = before.pop(gkey, None)
                if was is None or was[0] != total:
                    self._reshaped.add(gkey)
                elif len(free.get(gkey, ())) > was[1]:
                    self._freed.add(gkey)
            self._reshaped.update(before)  # groups the worker left

    def remove(self, worker_id: str) -> None:
        """Forget a worker (no-op if the index does not have it)."""
        self._reshaped.update(self._forget(worker_id))

    def _forget(self, worker_id: str) -> dict[GroupKey, tuple[int, int]]:
        """Forget a worker; returns its (GPUs, free GPUs) per group key (when tracking)."""
        if self._keys.pop(worker_id, None) is None:
            return {}
        for env in self._envs_of.pop(worker_id, ()):
            holders = self._holders[env]
            holders.discard(worker_id)
            if not holders:
                del self._holders[env]
        had: dict[GroupKey, tuple[int, int]] = {}
        for group in self._member_of.pop(worker_id):
            if self._track:
                had[group.key] = (group.totals[worker_id], len(group.free_idx.get(worker_id, ())))
            if group.remove(worker_id):
                del self._groups[group.key]
                self._order = None
        return had

    def place(
        self, pending: Iterable[JobRequest], *, take: bool = True, topology: bool = True
    ) -> SchedulingResult:
        """Place ``pending`` greedily in order, as :func:`place` does, taking the GPUs.

        With ``take=False`` nothing is taken: every job is placed as if it came first
        (what :meth:`probe` needs). With ``topology=False`` the choice ignores link widths
        (:func:`~broker.scheduler.scores.topology_score` is 0 everywhere): the scoring
        before issue 15, which the trace replay compares against."""
        groups = self._groups_in_order()
        keys = self._keys
        filters: dict[FilterKey, GroupFilter] = {}
        workers = len(keys)
        placements: list[Placement] = []
        unplaced: list[Unplaced] = []
        version = 0  # placements so far; cached count reasons are valid while it is unchanged

        for job in pending:
            n = job.gpu_count
            fkey = (  # filter_key(job), written out: this loop is the hot path
                job.gpu_model,
                job.min_vram_mb,
                job.max_price_micros_per_gpu_hour,
                job.containers,
                job.allow_unverified,
                job.min_score,
                job.min_pcie_mbps,
                job.min_ram_gb_per_gpu,
                job.min_cpu_millicores_per_gpu,
            )
            filt = filters.get(fkey)
            if filt is None:
                filt = filters[fkey] = make_filter(groups, fkey, workers)
            if 0 < n < filt.fail_at:
                local = self._local(job.environment, filt, n) if job.environment else ()
                wide = narrow = False
                if topology and filt.links:
                    wide = n > 1 or job.min_pcie_mbps > 0
                    narrow = not wide
                took = _take(filt, n, keys, local, take, wide, narrow)
                if took is not None:
                    group, worker_id, taken = took
                    placements.append(Placement(job.job_id, worker_id, taken, group.price))
                    version += 1
                    continue
                filt.fail_at = n  # and every larger gang with these filters, for this pass
            cached = filt.reasons.get(n)
            if cached is None or (cached[0] != version and filt.static is None):
                if filt.static is None:
                    reason = gpu_count_rejection(job, filt)
                elif n == 1:
                    reason = filt.static
                else:  # the topology filters' messages name the gang
                    reason = _static_rejection(groups, fkey, workers, n) or filt.static
                cached = filt.reasons[n] = (version, (reason,))
            unplaced.append(Unplaced(job.job_id, cached[1]))

        return SchedulingResult(tuple(placements), tuple(unplaced))

    def probe(self, job: JobRequest) -> SchedulingResult:
        """Where ``job`` would go if a pass ran now, or why nowhere; takes nothing (it may
        drop heap entries that went stale, as any pass does: that changes no answer)."""
        return self.place((job,), take=False)

    def matching(self, job: JobRequest) -> tuple[GroupSummary, ...]:
        """The groups passing ``job``'s static filters, cheapest first (QuoteJob's figures);
        costs the groups, not the fleet."""
        fkey = filter_key(job)
        groups, _ = static_filter(self._groups_in_order(), *fkey, workers=len(self._keys))
        return tuple(g.summary() for g in groups)

    def workers_in(self, group: GroupSummary) -> Iterator[str]:
        """Ids of the indexed workers with GPUs in ``group``."""
        found = self._groups.get(group.key)
        return iter(found.totals if found is not None else ())

    def _groups_in_order(self) -> list[FreeGroup]:
        """Every group, cheapest first (then VRAM, model and the rest of its key): the order
        filters keep."""
        if self._order is None:
            self._order = sorted(
                self._groups.values(), key=lambda g: (g.price, g.vram, g.model, g.key[3:])
            )
        return self._order

    def _local(
        self, environment: str, filt: GroupFilter, n: int
    ) -> list[tuple[FreeGroup, RankKey, int]]:
        """(group, rank key, free count) of every worker holding ``environment`` with ``n``
        free GPUs in a group that passes ``filt``; costs the holders, not the fleet."""
        holders = self._holders.get(environment) if environment else None
        if not holders:
            return []
        out = []
        for wid in holders:
            for group in self._member_of[wid]:
                free = group.free_idx.get(wid)
                if free is not None and len(free) >= n and id(group) in filt.group_ids:
                    out.append((group, self._keys[wid], len(free)))
        return out


def filter_key(job: JobRequest) -> FilterKey:
    """What decides which groups a job may use: its request without id, count and environment."""
    return (
        job.gpu_model,
        job.min_vram_mb,
        job.max_price_micros_per_gpu_hour,
        job.containers,
        job.allow_unverified,
        job.min_score,
        job.min_pcie_mbps,
        job.min_ram_gb_per_gpu,
        job.min_cpu_millicores_per_gpu,
    )


def _static_rejection(
    groups: list[FreeGroup], fkey: FilterKey, workers: int, n: int
) -> Rejection | None:
    """The static filters' rejection worded for a gang of ``n``."""
    return static_filter(groups, *fkey, workers=workers, gpu_count=n)[1]


def _take(
    filt: GroupFilter,
    n: int,
    keys: dict[str, RankKey],
    local: Sequence[tuple[FreeGroup, RankKey, int]],
    take: bool = True,
    wide: bool = False,
    narrow: bool = False,
) -> tuple[FreeGroup, str, tuple[int, ...]] | None:
    """Choose by :func:`choice_key` among the qualifying groups and take the gang from the
    index (unless ``take`` is False); returns (group, worker id, GPU indices) or None if no
    worker has ``n`` free.

    Per group the best candidate without locality is the top of its best-fit bucket's heap;
    ``local`` lists every candidate holding the job's environment, each scored with it. The
    smallest key of both is the choice, as a scan of every (worker, group) would find.
    ``wide``/``narrow``: the job prefers the widest/narrowest links
    (:func:`~broker.scheduler.scores.topology_score`); neither: links do not count."""
    best: FreeGroup | None = None
    best_key: ChoiceKey | None = None
    best_rank: RankKey | None = None
    best_free = 0
    local_ids = {rank[1] for _, rank, _ in local} if local else None
    dead: list[FreeGroup] = []
    # Cheapest first, then by the job's topology score: once a candidate is found, a group
    # with a higher price, or the same price and a worse topology score, cannot win.
    for group in filt.by_links(wide) if wide or narrow else filt.groups:
        topo = -group.pcie if wide else group.pcie if narrow else 0
        if best_key is not None and (
            group.price > best_key[0] or (group.price == best_key[0] and topo > best_key[1])
        ):
            break
        fits = group.mask >> n
        if not fits:
            if not group.mask:
                dead.append(group)
            continue
        free = n + (fits & -fits).bit_length() - 1  # smallest bucket >= n: best fit
        heap = group.heaps[free]
        while not group.live(heap[0], free, keys):  # drop entries gone stale since
            heappop(heap)
        rel, worker_id = heap[0]
        near = 1 if local_ids is not None and worker_id in local_ids else 0
        key = choice_key(group.price, free, n, worker_id, group.vram, group.model, -rel, near, topo)
        if best_key is None or key < best_key:
            best, best_key, best_rank, best_free = group, key, heap[0], free
    for group, rank, free in local:
        topo = -group.pcie if wide else group.pcie if narrow else 0
        key = choice_key(group.price, free, n, rank[1], group.vram, group.model, -rank[0], 1, topo)
        if best_key is None or key < best_key:
            best, best_key, best_rank, best_free = group, key, rank, free
    if dead:
        filt.drop(dead)
    if best is None or best_rank is None:
        return None
    # The chosen worker's heap entry goes stale once its free count changes (lazy pruning).
    rank = best_rank
    worker_id = rank[1]
    free_list = best.free_idx[worker_id]
    taken = tuple(free_list[:n])
    if not take:
        return best, worker_id, taken
    del free_list[:n]
    best.free_gpus -= n
    best.leave(best_free)
    if best_free > n:
        best.enter(rank, best_free - n, keys)
    else:
        del best.free_idx[worker_id]
    return best, worker_id, taken


def place(snapshot: Snapshot, *, topology: bool = True) -> SchedulingResult:
    """Place the pending jobs of ``snapshot`` greedily in order; pure and deterministic
    (``topology``: see :meth:`FleetIndex.place`).

    Raises ValueError if the snapshot repeats a worker_id or a GPU index on one worker.
    """
    return FleetIndex(snapshot.workers, track=False).place(snapshot.pending, topology=topology)
