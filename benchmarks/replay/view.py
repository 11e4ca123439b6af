"""The scheduling view the replay gives the broker core: :class:`LeanView`.

The replay runs the production ``broker.core.BrokerCore`` and injects this view through
its public seam (``BrokerCore(view=...)``, ``broker.queue.SchedulingView``). Everything
that decides (queue order, placement by ``broker.scheduler.place``, binding, preemption,
settlement, SLA events) is the core's and the scheduler's; the view only shows
``place()`` less of the queue and the fleet when the rest cannot change the outcome, and
can cut the queue at its first misfit (strict FIFO first fit, the ``fifo`` baseline).
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Sequence
from heapq import heapify, heappop, heappush

from broker.scheduler import (
    FleetIndex,
    JobRequest,
    SchedulingResult,
    Snapshot,
    WorkerCapacity,
    place,
)

__all__ = ["LeanView"]


class LeanView:
    """A ``SchedulingView`` that shows ``place()`` a lean snapshot; order is the core's.

    What differs from the broker's own view (``broker.queue.KeptQueue``):

    * **order** -- the core's own (``queue_policy``: the keys the core queues jobs with),
      kept as one sorted list per gang size so that jobs too wide for any free rig are
      skipped.
    * **head_of_line** (``fifo``) -- the view is cut after the first job that does not fit:
      strict FIFO first fit instead of the core's greedy backfill.
    * **lean** (default) -- the view holds only what can change the outcome, so a pass costs
      what it places rather than the queue length times the fleet. Jobs: those no wider
      than the most free GPUs on one rig, up to where the free GPUs run out (found by trial
      ``place()`` calls; place is greedy in order, so its first decisions do not depend on
      later jobs). Workers, for k jobs of at most N GPUs: groups (price, VRAM, model, link) in
      place()'s order, cheapest first, up to the price at which k rigs have N free GPUs
      (no job can end up dearer), and in each the k best-ranked rigs of every free-GPU
      bucket (place only ever takes a bucket's best); plus the rig with the most GPUs, so
      that "resolvable" in rejections is unchanged. Placements are exactly those of the
      full view (``lean=False``; the smoke test checks it); the "best has N" text of a
      rejection may differ. Jobs left out keep their last pending reasons, here always
      "gpu_count, resolvable", so SLA credits do not change. :meth:`worth_a_pass` is False
      when a pass could place nothing; the replay then skips it.

    Rigs must be homogeneous and stay online, and jobs name no model, VRAM or price cap,
    as ``replay.simulate.replay`` makes them.
    """

    def __init__(
        self, *, head_of_line: bool = False, lean: bool = True, topology: bool = True
    ) -> None:
        self.head_of_line = head_of_line
        self.lean = lean
        self.topology = topology  # place() with the topology score (False: price only)
        self.queues: dict[int, list[tuple[tuple, str]]] = {}  # gang size -> sorted (key, job)
        self.pending_sizes: dict[int, int] = {}  # gang size -> PENDING jobs
        self._pending: dict[str, JobRequest] = {}  # PENDING job -> what the scheduler sees
        self._keys: dict[str, tuple] = {}  # job id -> its entry's key, while queued
        self._caps: dict[str, WorkerCapacity] = {}  # ONLINE worker -> what the scheduler sees
        self._changed: set[str] = set()  # workers changed since the last refresh
        self._free: dict[str, tuple] = {}  # online worker with free GPUs -> see _refresh
        self._by_group: dict[tuple, dict[str, tuple]] = {}  # the same, by group, cheapest first
        self._widest: str | None = None  # a rig with the most GPUs
        self._rigs_with: dict[int, int] = {}  # free GPUs -> online rigs with that many free
        self._room = 0  # free GPUs on online rigs

    # --- what the core tells the view (broker.queue.SchedulingView) ---------------------

    def job_queued(self, job_id: str, key: tuple, request: JobRequest) -> None:
        self._pending[job_id] = request
        n = request.gpu_count
        self.pending_sizes[n] = self.pending_sizes.get(n, 0) + 1
        if job_id not in self._keys:  # else its entry is still queued
            self._keys[job_id] = key
            insort(self.queues.setdefault(n, []), (key, job_id))

    def job_dequeued(self, job_id: str) -> None:
        self.pending_sizes[self._pending.pop(job_id).gpu_count] -= 1

    def worker_changed(self, worker_id: str, capacity: WorkerCapacity | None) -> None:
        if capacity is None:
            self._caps.pop(worker_id, None)
        else:
            self._caps[worker_id] = capacity
        self._changed.add(worker_id)

    def place(self, fleet: FleetIndex, now: float) -> SchedulingResult:
        # This view chooses what the scheduler sees, so it places from its own snapshot
        # instead of the core's kept index (which the core updates after the pass).
        return place(self.snapshot(now), topology=self.topology)

    # --- the view --------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Bring the free-capacity index up to date with the workers that changed."""
        for wid in self._changed:
            old = self._free.pop(wid, None)
            if old is not None:
                del self._by_group[old[4]][wid]
                self._rigs_with[old[3]] -= 1
                self._room -= old[3]
            cap = self._caps.get(wid)
            if cap is None:
                continue
            if self._widest is None or len(self._caps[self._widest].gpus) < len(cap.gpus):
                self._widest = wid
            free = sum(1 for g in cap.gpus if g.free)
            if free:
                g = cap.gpus[0]
                # place()'s group order; rigs of one model and price that differ in their
                # links are different groups (the topology score tells them apart)
                group = (g.price_micros_per_gpu_hour, g.vram_mb, g.model, g.pcie_mbps)
                entry = (-cap.reliability_permille, wid, cap, free, group)  # by place()'s rank
                self._free[wid] = entry
                self._rigs_with[free] = self._rigs_with.get(free, 0) + 1
                self._room += free
                if group not in self._by_group:
                    self._by_group = dict(sorted({**self._by_group, group: {}}.items()))
                self._by_group[group][wid] = entry
        self._changed.clear()

    def _head(self) -> tuple[tuple, str] | None:
        """The first PENDING job in queue order, dropping finished entries on the way."""
        best = None
        for q in self.queues.values():
            while q and q[0][1] not in self._pending:
                del self._keys[q.pop(0)[1]]
            if q and (best is None or q[0] < best):
                best = q[0]
        return best

    def worth_a_pass(self) -> bool:
        """False when a scheduling pass now could not place any job."""
        if not self._pending:
            return False
        if not self.lean:
            return True
        self._refresh()
        widest = max((f for f, rigs in self._rigs_with.items() if rigs), default=0)
        if self.head_of_line:
            head = self._head()
            return head is not None and self._pending[head[1]].gpu_count <= widest
        return 0 < min((n for n, c in self.pending_sizes.items() if c), default=0) <= widest

    def _workers(self, jobs: Sequence[JobRequest]) -> tuple[WorkerCapacity, ...]:
        """The rigs a pass over ``jobs`` may touch, and the widest rig (see the class doc)."""
        k = len(jobs)
        widest_job = max((j.gpu_count for j in jobs), default=0)
        shown: list[WorkerCapacity] = []
        fitting = 0  # rigs, shown or not, that could take any of the jobs
        cutoff = None  # price of the group where ``fitting`` reached k
        for group, members in self._by_group.items():
            if cutoff is not None and group[0] > cutoff:
                break
            per_bucket: dict[int, int] = {}
            for e in sorted(members.values()):
                free = e[3]
                shown_here = per_bucket.get(free, 0)
                if shown_here < k:
                    per_bucket[free] = shown_here + 1
                    shown.append(e[2])
                fitting += free >= widest_job
            if cutoff is None and fitting >= k:
                cutoff = group[0]
        if self._widest is not None and self._widest not in {c.worker_id for c in shown}:
            shown.append(self._caps[self._widest])
        return tuple(shown)

    def snapshot(self, now: float) -> Snapshot:
        """What ``place()`` sees this pass (the class docstring)."""
        if not self.lean:
            order = sorted(self._pending, key=self._keys.__getitem__)
            pending = tuple(self._pending[j] for j in order)
            snap = Snapshot(now, pending, tuple(self._caps.values()))
            if self.head_of_line and (result := place(snap, topology=self.topology)).unplaced:
                first = result.unplaced[0].job_id
                cut = next(i for i, r in enumerate(snap.pending) if r.job_id == first)
                return Snapshot(now, snap.pending[: cut + 1], snap.workers)
            return snap
        self._refresh()
        jobs = self._presented(now)
        return Snapshot(now, jobs, self._workers(jobs))

    def _presented(self, now: float) -> tuple[JobRequest, ...]:
        """The pending jobs to show, in order (see the class docstring)."""
        room = self._room
        widest = max(f for f, rigs in self._rigs_with.items() if rigs)
        if self.head_of_line:
            widest = max(self.queues)
        heap = [(q[0][0], n, 0) for n, q in self.queues.items() if q and n <= widest]
        heapify(heap)
        stale: list[tuple[int, int]] = []
        chosen: list[JobRequest] = []
        wanted = 0  # GPUs asked for by the jobs chosen since the last trial
        target = 2  # fifo: jobs to try next; doubles while they all fit
        while True:
            while heap and (
                len(chosen) < min(target, room + 1) if self.head_of_line else wanted < room
            ):
                _, n, pos = heappop(heap)
                q = self.queues[n]
                job_id = q[pos][1]
                if pos + 1 < len(q):
                    heappush(heap, (q[pos + 1][0], n, pos + 1))
                request = self._pending.get(job_id)
                if request is None:
                    stale.append((n, pos))
                    continue
                chosen.append(request)
                wanted += n
            if len(chosen) <= 1 or (not heap and not self.head_of_line):
                break  # one job, or every candidate is shown
            trial = tuple(chosen)
            result = place(Snapshot(now, trial, self._workers(trial)), topology=self.topology)
            if self.head_of_line:
                if result.unplaced or not heap or len(chosen) > room:
                    if result.unplaced:
                        first = result.unplaced[0].job_id
                        cut = next(i for i, r in enumerate(chosen) if r.job_id == first)
                        chosen = chosen[: cut + 1]
                    break
                target *= 2
                continue
            left = {wid: e[3] for wid, e in self._free.items()}
            for p in result.placements:
                left[p.worker_id] -= len(p.gpu_indices)
            room = sum(left.values())
            widest = max(left.values(), default=0)
            if widest < min((n for n, c in self.pending_sizes.items() if c), default=0):
                break
            heap = [h for h in heap if h[1] <= widest]
            heapify(heap)
            wanted = 0
        for n, pos in sorted(stale, reverse=True):
            del self._keys[self.queues[n].pop(pos)[1]]
        return tuple(chosen)
