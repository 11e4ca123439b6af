"""Parked jobs: a scheduling pass costs what changed, not the length of the queue.

:class:`ParkingQueue` is the broker's scheduling view (``broker.queue.SchedulingView``). It
keeps the queue in the policy's order, as :class:`~broker.queue.KeptQueue` does, and
**parks** every job a pass leaves pending under its *class*: what the index sees of its
request (filters and gang size, not its id or environment), how many static filters a group
must pass to matter to it (``broker.scheduler.filters.STAGES``: the stages before the one
that rejected it), and whether it may preempt. A later pass examines a parked job again only
when something that could change its outcome happened (:meth:`ParkingQueue.examine`):

* **free GPUs** -- a group that passes all of the class's filters gained free GPUs on some
  worker and now has a worker with at least the class's gang free (a GPU of another model,
  or fewer free than the gang, wakes nobody): the first jobs of the class in queue order
  wake, as many as those groups' free GPUs could hold, gangs on one worker (:func:`_woken`);
* **a new shape** -- a group that passes the stages before the class's rejection gained or
  lost GPUs (a worker joined or left it, registered, came online or went offline, drained,
  changed prices, verification or score): "resolvable" and the rejecting filter depend on
  those, so a parked job's reason stays right in everything but its figures;
* **curtailment windows** -- while any window is open, and for the first pass after the last
  one closed, every queued job is examined (the reasons name the windows, and they move
  with time);
* **preemption** -- while any spot attempt runs, parked guaranteed jobs whose reason is a
  resolvable ``gpu_count`` go through the core's preemption step every pass, as before
  (``BrokerCore._schedule``).

Within a pass, capacity is only taken, so a job is rejected exactly when a full pass would
reject it; the jobs examined keep their order. A parked job keeps the reasons of its last
examination: their kind (resource, requested, resolvable, and the curtailment reasons) is
always what a full pass would give, their figures ("best has 2") are as of that
examination. A full pass would rewrite every waiting job whose figure moved; parking writes
only the jobs it examined.
"""

from __future__ import annotations

from collections.abc import Iterable

from broker.scheduler import FleetIndex, JobRequest, Rejection, SchedulingResult
from broker.scheduler.filters import STAGES, passes_stages
from broker.scheduler.groups import FilterKey
from broker.scheduler.index import filter_key

__all__ = ["ParkingQueue", "may_wait"]

# (filter key, gang size, stages a group must pass to matter, may preempt)
_ClassKey = tuple[FilterKey, int, int, bool]
ALL_STAGES = STAGES["gpu_count"]


def may_wait(reason: Rejection | None) -> bool:
    """True for a resolvable ``gpu_count`` rejection: the GPUs are busy, so waiting (or
    preempting spot work, for a guaranteed job) may help."""
    return reason is not None and reason.resource == "gpu_count" and reason.resolvable


def stages_of(reason: Rejection | None) -> int:
    """How many static filters a group must pass to matter to a job rejected for ``reason``:
    the stages before the rejecting one; all of them for a resolvable ``gpu_count``; none
    (every change matters) for an unresolvable one, which an empty fleet gives too."""
    if reason is None:
        return 0
    if reason.resource == "gpu_count":
        return ALL_STAGES if reason.resolvable else 0
    return STAGES.get(reason.resource, 0)


class _Class:
    """The parked jobs of one class: a set, and their entries in queue order (entries of
    jobs that left the class are dropped lazily)."""

    __slots__ = ("members", "order", "sorted")

    def __init__(self) -> None:
        self.members: dict[str, None] = {}
        self.order: list[tuple[tuple, str]] = []  # (queue key, job id), may hold stale ones
        self.sorted = True

    def add(self, key: tuple, job_id: str) -> None:
        self.members[job_id] = None
        if len(self.order) > 2 * len(self.members) + 16:  # mostly stale: compact
            self.order = [e for e in self.order if e[1] in self.members and e[1] != job_id]
        if self.order and key < self.order[-1][0]:
            self.sorted = False
        self.order.append((key, job_id))

    def first(self, m: int) -> list[str]:
        """Take out the first ``m`` parked jobs in queue order."""
        if not self.sorted or len(self.order) > 2 * len(self.members) + 16:
            self.order = sorted(e for e in self.order if e[1] in self.members)
            self.sorted = True
        out: list[str] = []
        members, order = self.members, self.order
        i = 0
        while i < len(order) and len(out) < m:
            job_id = order[i][1]
            if job_id in members:
                del members[job_id]
                out.append(job_id)
            i += 1
        del order[:i]  # the jobs taken out, and stale entries before them
        return out


class ParkingQueue:
    """The broker's view: the queue in order, rejected jobs parked by class (module doc)."""

    __slots__ = ("_classes", "_fresh", "_keys", "_parked", "_requests", "_windowed")

    def __init__(self) -> None:
        self._keys: dict[str, tuple] = {}  # queued job -> its place (smallest first)
        self._requests: dict[str, JobRequest] = {}  # queued job -> what the scheduler sees
        self._fresh: set[str] = set()  # queued jobs not parked: the next pass examines them
        self._parked: dict[str, _ClassKey] = {}  # parked job -> its class
        self._classes: dict[_ClassKey, _Class] = {}  # class -> its parked jobs
        self._windowed = False  # the last pass saw an open curtailment window

    # --- SchedulingView -------------------------------------------------------------------

    def job_queued(self, job_id: str, key: tuple, request: JobRequest) -> None:
        """A job became PENDING: the next pass examines it."""
        self._unpark(job_id)
        self._keys[job_id] = key
        self._requests[job_id] = request
        self._fresh.add(job_id)

    def job_dequeued(self, job_id: str) -> None:
        """A job stopped being PENDING."""
        self._unpark(job_id)
        self._keys.pop(job_id, None)
        self._requests.pop(job_id, None)
        self._fresh.discard(job_id)

    def worker_changed(self, worker_id: str, capacity: object) -> None:
        """Nothing: the core keeps the index (and its record of changes)."""

    def place(self, fleet: FleetIndex, now: float) -> SchedulingResult:
        """A full pass over every queued job on ``fleet`` (the core calls :meth:`examine`
        instead; this keeps the view usable on its own)."""
        return fleet.place(self._in_order(self._keys))

    # --- parking --------------------------------------------------------------------------

    def examine(
        self,
        fleet: FleetIndex,
        freed: Iterable[tuple],
        reshaped: Iterable[tuple],
        windows: bool,
    ) -> list[JobRequest]:
        """The jobs this pass must examine, in queue order: those queued since the last pass
        and the parked ones whose class a change woke (``freed``/``reshaped``: the group keys
        ``fleet.drain_changes()`` gave); every queued job while ``windows`` (a curtailment
        window is open) and in the first pass after. They leave their classes: the core
        parks again the ones it leaves pending (:meth:`park`)."""
        every = windows or self._windowed
        self._windowed = windows
        chosen = list(self._fresh)
        self._fresh.clear()
        if every:
            chosen += self._parked
            self._parked.clear()
            self._classes.clear()
        else:
            freed = [g for g in freed if fleet.best_free(g)]
            reshaped = list(reshaped)
            if freed or reshaped:
                for klass, parked in list(self._classes.items()):
                    m = _woken(klass, fleet, freed, reshaped)
                    if m is None:
                        taken = list(parked.members)
                        del self._classes[klass]
                    elif m:
                        taken = parked.first(m)
                        if not parked.members:
                            del self._classes[klass]
                    else:
                        continue
                    for job_id in taken:
                        del self._parked[job_id]
                    chosen += taken
        return self._in_order(chosen)

    def preemptible(self) -> list[str]:
        """The parked jobs that may preempt (guaranteed, waiting for busy GPUs)."""
        out: list[str] = []
        for klass, parked in self._classes.items():
            if klass[3]:
                out += parked.members
        return out

    def park(self, job_id: str, reason: Rejection | None, may_preempt: bool) -> None:
        """Park a queued job the pass left pending, rejected first for ``reason``."""
        request = self._requests[job_id]
        klass = (filter_key(request), request.gpu_count, stages_of(reason), may_preempt)
        if self._parked.get(job_id) == klass:
            return  # a parked job that went through the preemption step again
        self._unpark(job_id)
        parked = self._classes.get(klass)
        if parked is None:
            parked = self._classes[klass] = _Class()
        parked.add(self._keys[job_id], job_id)
        self._parked[job_id] = klass

    def key(self, job_id: str) -> tuple:
        """A queued job's place in the queue."""
        return self._keys[job_id]

    def parked(self) -> int:
        """How many jobs are parked."""
        return len(self._parked)

    def _unpark(self, job_id: str) -> None:
        klass = self._parked.pop(job_id, None)
        if klass is not None:
            parked = self._classes[klass]
            del parked.members[job_id]
            if not parked.members:
                del self._classes[klass]

    def _in_order(self, job_ids: Iterable[str]) -> list[JobRequest]:
        keys, requests = self._keys, self._requests
        return [requests[j] for j in sorted(job_ids, key=keys.__getitem__)]


def _woken(
    klass: _ClassKey, fleet: FleetIndex, freed: list[tuple], reshaped: list[tuple]
) -> int | None:
    """Which parked jobs of ``klass`` a pass must examine: None for all of them (a group
    that matters to it changed shape: the reason may change); else how many of the first in
    queue order (0: none). GPUs freed in groups that pass all its filters wake at most as
    many as the freed groups' free GPUs could hold, a gang per worker with that many free
    (``FleetIndex.gangs_free``): the jobs were
    rejected when no worker of any matching group had a gang free, so only those groups can
    take one now, and within a pass capacity only shrinks, so once that many are examined,
    one of them was rejected and every later one would be too."""
    fkey, n, stages, _ = klass
    if any(passes_stages(g, fkey, stages) for g in reshaped):
        return None
    if stages != ALL_STAGES or n < 1:
        return 0
    return sum(fleet.gangs_free(g, n) for g in freed if passes_stages(g, fkey, ALL_STAGES))
