"""FleetIndex, the scheduler's index kept between passes, against place() on a fresh snapshot.

Two Hypothesis state machines:

* ``FleetIndexMachine`` adds, replaces and removes workers, takes and frees GPUs, changes
  reliability and runs passes; after every step a pass on (a copy of) the kept index must
  equal ``place(Snapshot(...))`` of the same workers, placements and rejection messages
  alike, and every pass's result must also match brute force.
* ``LockstepCoreMachine`` runs the core's own random event sequences
  (``test_core_stateful.CoreMachine``) through two cores at once: one placing every queued
  job on the kept index each pass (``KeptQueue``; the broker's default parks jobs,
  ``test_parking.py``) and one given a view (``BrokerCore(view=SnapshotView())``) that
  places every pass with ``place(Snapshot(...))`` of all it was told, as the core used to.
  Every event must give both the same commands, and every job the same pending reasons.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from test_core_stateful import CoreMachine
from test_scheduler import ENVS, _flatten, _reference, workers

from broker.core import BrokerCore
from broker.events import Command, Event
from broker.queue import KeptQueue
from broker.scheduler import (
    FleetIndex,
    JobRequest,
    Rejection,
    SchedulingResult,
    Snapshot,
    WorkerCapacity,
    place,
)
from harness.broker_fixtures import make_gpu, make_job, make_snapshot, make_worker

IDS = [f"w-{c}" for c in "abcdefg"]
RELIABILITY = st.sampled_from([1000, 1000, 990, 900, 500])


@st.composite
def jobs(draw: st.DrawFn) -> list[JobRequest]:
    return [
        dataclasses.replace(
            make_job(
                f"j{k}",
                draw(st.integers(0, 10)),
                gpu_model=draw(st.sampled_from(["", "", "RTX 3090", "RTX 3060", "A4000", "A100"])),
                min_vram_mb=draw(st.sampled_from([0, 0, 10_000, 16_384, 30_000])),
                max_price_micros_per_gpu_hour=draw(
                    st.sampled_from([0, 0, 200_000, 250_000, 100_000])
                ),
                environment=draw(st.sampled_from(["", "", *ENVS])),
            ),
            containers=draw(st.sampled_from([False, False, True])),  # an image job
        )
        for k in range(draw(st.integers(0, 12)))
    ]


# Every gang size under every filter the workers() strategy can make matter: a pass on the
# index must agree with place() on all of them, rejection texts included.
PROBE = tuple(
    dataclasses.replace(
        make_job(f"p{i}", n, gpu_model=model, min_vram_mb=vram, max_price_micros_per_gpu_hour=cap),
        containers=containers,
    )
    for i, (n, model, vram, cap, containers) in enumerate(
        (n, model, vram, cap, containers)
        for model in ("", "RTX 3090", "RTX 3060", "A4000", "A100")
        for vram in (0, 16_384, 30_000)
        for cap in (0, 200_000, 250_000)
        for n in (0, 1, 2, 3, 5, 8, 10)
        for containers in (False, True)
    )
)


class FleetIndexMachine(RuleBasedStateMachine):
    """The truth is ``self.fleet``; the index is only ever told what changed."""

    @initialize()
    def setup(self) -> None:
        self.fleet: dict[str, WorkerCapacity] = {}
        self.index = FleetIndex()
        self.peak = 0  # most workers the index has had

    def _tell(self, worker: WorkerCapacity) -> None:
        self.fleet[worker.worker_id] = worker
        self.index.update(worker)
        self.peak = max(self.peak, len(self.index))

    @rule(
        worker=workers(),
        worker_id=st.sampled_from(IDS),
        reliability=RELIABILITY,
        containers=st.booleans(),
    )
    def add_or_replace(
        self, worker: WorkerCapacity, worker_id: str, reliability: int, containers: bool
    ) -> None:
        """Registration (or a new agent process): the whole capacity may differ, the
        container runtime too."""
        self._tell(
            dataclasses.replace(
                worker,
                worker_id=worker_id,
                reliability_permille=reliability,
                containers=containers,
            )
        )

    @rule(worker_id=st.sampled_from(IDS))
    def remove(self, worker_id: str) -> None:
        """Offline, draining, or never there (a no-op)."""
        self.fleet.pop(worker_id, None)
        self.index.remove(worker_id)

    @precondition(lambda self: self.fleet)
    @rule(data=st.data())
    def take_or_free(self, data: st.DataObject) -> None:
        """Bind or release: some GPUs of one worker change between free and busy."""
        worker = self.fleet[data.draw(st.sampled_from(sorted(self.fleet)))]
        flip = data.draw(st.sets(st.sampled_from([g.index for g in worker.gpus] or [0])))
        gpus = tuple(dataclasses.replace(g, free=g.free != (g.index in flip)) for g in worker.gpus)
        self._tell(dataclasses.replace(worker, gpus=gpus))

    @precondition(lambda self: self.fleet)
    @rule(data=st.data(), reliability=RELIABILITY)
    def reliability_changes(self, data: st.DataObject, reliability: int) -> None:
        worker = self.fleet[data.draw(st.sampled_from(sorted(self.fleet)))]
        self._tell(dataclasses.replace(worker, reliability_permille=reliability))

    @rule(pending=jobs(), rebind=st.booleans())
    def schedule(self, pending: list[JobRequest], rebind: bool) -> None:
        """A pass; its placements are then bound in the truth. ``rebind`` also tells the
        index about every bound worker, as the core does; either way it must agree."""
        snapshot = make_snapshot(pending, self.fleet.values())
        result = self.index.place(pending)
        assert result == place(snapshot)
        if len({w.reliability_permille for w in self.fleet.values()}) <= 1:
            assert _flatten(result) == dict(_reference(snapshot))  # brute force ignores ranks
        for p in result.placements:
            worker = self.fleet[p.worker_id]
            taken = set(p.gpu_indices)
            gpus = tuple(
                dataclasses.replace(g, free=False) if g.index in taken else g for g in worker.gpus
            )
            self.fleet[p.worker_id] = dataclasses.replace(worker, gpus=gpus)
        if rebind:
            for worker_id in {p.worker_id for p in result.placements}:
                self.index.update(self.fleet[worker_id])

    @invariant()
    def agrees_with_a_fresh_snapshot(self) -> None:
        if not hasattr(self, "index"):
            return
        assert len(self.index) == len(self.fleet)
        probe = copy.deepcopy(self.index)  # a pass takes GPUs; probe a copy
        assert probe.place(PROBE) == place(make_snapshot(PROBE, self.fleet.values()))

    @invariant()
    def heaps_stay_small(self) -> None:
        """Lazily pruned heaps are compacted: stale entries never pile up."""
        if not hasattr(self, "index"):
            return
        for group in self.index._groups.values():
            for heap in group.heaps:
                assert len(heap) <= 2 * self.peak + 9


FleetIndexMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFleetIndexMachine = FleetIndexMachine.TestCase


# --- table tests --------------------------------------------------------------------------------


def test_max_total_falls_when_the_widest_worker_leaves() -> None:
    # w-big has 8 RTX 3090, w-small 2; with w-big gone no worker could ever hold 4
    index = FleetIndex([make_worker("w-big"), make_worker("w-small", gpu_count=2, busy={0, 1})])
    index.remove("w-big")
    (unplaced,) = index.place([make_job("j1", 4)]).unplaced
    assert unplaced.reasons == (
        Rejection(
            "gpu_count",
            "4 x GPU",
            "0",
            False,
            "no worker has 4 free GPUs: best has 0, and none has more than 2 in total",
        ),
    )


def test_a_group_goes_when_its_last_worker_does() -> None:
    index = FleetIndex([make_worker("w-a"), make_worker("w-b", model="RTX 3060")])
    index.remove("w-b")
    (unplaced,) = index.place([make_job("j1", 1, gpu_model="RTX 3060")]).unplaced
    assert unplaced.reasons[0].message == (
        "no GPU of model RTX 3060 is registered (fleet has RTX 3090)"
    )
    index.remove("w-a")
    (unplaced,) = index.place([make_job("j1", 1)]).unplaced
    assert unplaced.reasons[0].message == "no worker has 1 free GPU: the fleet has no GPUs"


def test_reliability_change_reorders_workers() -> None:
    # same price and fit; the more reliable worker wins, and the rank follows an update
    a = dataclasses.replace(make_worker("w-a"), reliability_permille=1000)
    b = dataclasses.replace(make_worker("w-b"), reliability_permille=900)
    index = FleetIndex([a, b])
    assert index.place([make_job("j1")]).placements[0].worker_id == "w-a"
    index.update(dataclasses.replace(a, reliability_permille=800))  # j1's GPU 0 is free again
    assert index.place([make_job("j2")]).placements[0].worker_id == "w-b"


def test_a_pass_leaves_the_index_as_if_its_placements_were_bound() -> None:
    index = FleetIndex([make_worker("w-a", gpu_count=4)])
    assert index.place([make_job("j1", 3)]).placements[0].gpu_indices == (0, 1, 2)
    bound = make_worker("w-a", gpu_count=4, busy={0, 1, 2})
    fresh = make_snapshot([make_job("j2", 1), make_job("j3", 1)], [bound])
    assert index.place(fresh.pending) == place(fresh)


def test_updates_refuse_duplicate_gpu_indices() -> None:
    index = FleetIndex()
    with pytest.raises(ValueError, match="duplicate GPU index"):
        index.update(make_worker("w-a", gpus=[make_gpu(0), make_gpu(0)]))
    with pytest.raises(ValueError, match="duplicate worker_id"):
        FleetIndex([make_worker("w-a"), make_worker("w-a")])


def test_churn_keeps_heaps_bounded() -> None:
    # one worker taking and freeing GPUs 1,000 times among 50 idle ones
    idle = [make_worker(f"w-{i:02}") for i in range(50)]
    index = FleetIndex(idle)
    for k in range(1000):
        index.update(make_worker("w-churn", busy=set(range(k % 8))))
    sizes = [len(h) for g in index._groups.values() for h in g.heaps]
    assert max(sizes) <= 2 * 51 + 9


# --- the core: kept index versus a snapshot per pass ---------------------------------------------


class SnapshotView:
    """A scheduling view without a kept index: every pass is ``place(Snapshot(...))`` of
    the queue (in key order) and the workers it was told about."""

    def __init__(self) -> None:
        self.queue: dict[str, tuple[tuple, JobRequest]] = {}
        self.workers: dict[str, WorkerCapacity] = {}

    def job_queued(self, job_id: str, key: tuple, request: JobRequest) -> None:
        self.queue[job_id] = (key, request)

    def job_dequeued(self, job_id: str) -> None:
        del self.queue[job_id]

    def worker_changed(self, worker_id: str, capacity: WorkerCapacity | None) -> None:
        if capacity is None:
            self.workers.pop(worker_id, None)
        else:
            self.workers[worker_id] = capacity

    def place(self, fleet: FleetIndex, now: float) -> SchedulingResult:
        pending = tuple(r for _, r in sorted(self.queue.values(), key=lambda e: e[0]))
        return place(Snapshot(now, pending, tuple(self.workers.values())))


class LockstepCoreMachine(CoreMachine):
    @initialize()
    def setup(self) -> None:
        super().setup()
        # The kept index with every queued job examined every pass (no parking:
        # test_parking.py checks parking against the same reference).
        self.core = BrokerCore(
            lease_ttl_s=self.core.lease_ttl_s, start_deadline_s=5.0, view=KeptQueue()
        )
        self.ref = BrokerCore(
            lease_ttl_s=self.core.lease_ttl_s, start_deadline_s=5.0, view=SnapshotView()
        )

    def _apply(self, event: Event) -> list[Command]:
        try:
            expected = self.ref.handle(event)
        except Exception as error:
            with pytest.raises(type(error)):
                super()._apply(event)
            raise
        cmds = super()._apply(event)
        assert cmds == expected
        return cmds

    @invariant()
    def same_reasons(self) -> None:
        if not hasattr(self, "core"):
            return
        for job_id, job in self.core.jobs.items():
            ref = self.ref.jobs[job_id]
            assert (job.state, job.pending_reasons) == (ref.state, ref.pending_reasons)


LockstepCoreMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLockstepCoreMachine = LockstepCoreMachine.TestCase
