"""Parked jobs (``broker.parking``): which changes wake which parked jobs, and a Hypothesis
lockstep of a parking core against a core that places every queued job every pass.

``ParkingLockstepMachine`` runs the core's random event sequences
(``test_core_stateful.CoreMachine``) through the broker's core (parking) and one given
``SnapshotView`` (a full ``place(Snapshot(...))`` every pass). After every event both must
give the same commands (``Persist`` aside: a parked job whose figures moved is not
rewritten, so the parking core persists a subset of the jobs), every job the same state and
the same kind of pending reasons (resource, requested, resolvable, in order): only the
figures of a parked job's reasons may be older.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import initialize, invariant
from test_core_stateful import CoreMachine
from test_fleet_index import SnapshotView

from broker.core import BrokerCore
from broker.events import (
    Assign,
    AttemptFinished,
    AttemptStarted,
    Command,
    CurtailmentScheduled,
    DrainRequested,
    Event,
    JobSubmitted,
    Persist,
    SchedulePass,
    Tick,
    WorkerRegistered,
)
from broker.model import GpuInfo, JobSpec, JobState
from broker.parking import ParkingQueue
from broker.scheduler import FleetIndex, JobRequest
from broker.windows import Window
from harness.broker_fixtures import healthy

H = 3600.0


class SpyQueue(ParkingQueue):
    """A parking queue that records which jobs each pass examined."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[str]] = []

    def examine(self, fleet: FleetIndex, freed, reshaped, windows: bool) -> list[JobRequest]:
        out = super().examine(fleet, freed, reshaped, windows)
        self.seen.append([r.job_id for r in out])
        return out


def gpus(model: str, n: int = 1) -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(i, f"{model}-{i}", model, 24576, 350, 300_000, measurement=healthy(model, 24576))
        for i in range(n)
    )


def spec(model: str = "", gpu_count: int = 1) -> JobSpec:
    return JobSpec(command=("x",), gpu_count=gpu_count, gpu_model=model)


def busy_core() -> tuple[BrokerCore, SpyQueue]:
    """w1 has one RTX 3090, w2 one RTX 3060 and w3 two RTX 3090, all running a job; "j"
    waits for a 3090 and "gang" for two."""
    view = SpyQueue()
    core = BrokerCore(lease_ttl_s=1e9, view=view)
    core.handle(WorkerRegistered(0.0, "w1", "f1", "rig", "1", gpus("RTX 3090")))
    core.handle(WorkerRegistered(0.0, "w2", "f1", "rig", "1", gpus("RTX 3060")))
    core.handle(WorkerRegistered(0.0, "w3", "f1", "rig", "1", gpus("RTX 3090", 2)))
    for job, model, n in (("b1", "RTX 3090", 1), ("b2", "RTX 3060", 1), ("b3", "RTX 3090", 2)):
        core.handle(JobSubmitted(0.0, job, "c", spec(model, n)))
    core.handle(SchedulePass(0.0))
    for worker, job in (("w1", "b1"), ("w2", "b2"), ("w3", "b3")):
        core.handle(AttemptStarted(1.0, worker, job, 1, 1))
    core.handle(JobSubmitted(2.0, "j", "c", spec("RTX 3090")))
    core.handle(JobSubmitted(2.5, "gang", "c", spec("RTX 3090", 2)))
    core.handle(SchedulePass(2.5))
    assert view.seen[-1] == ["j", "gang"]
    assert view.parked() == 2
    return core, view


def test_a_steady_pass_examines_nothing() -> None:
    core, view = busy_core()
    assert core.handle(SchedulePass(3.0)) == []
    assert view.seen[-1] == []


def test_a_freed_gpu_of_another_model_wakes_nobody() -> None:
    core, view = busy_core()
    core.handle(AttemptFinished(3.0, "w2", "b2", 1, 2, 0))
    core.handle(SchedulePass(3.0))
    assert view.seen[-1] == []
    assert core.jobs["j"].state == JobState.PENDING


def test_a_freed_matching_gpu_wakes_the_jobs_it_fits() -> None:
    core, view = busy_core()
    core.handle(AttemptFinished(3.0, "w1", "b1", 1, 2, 0))
    cmds = core.handle(SchedulePass(3.0))
    # One 3090 free: the single-GPU job wakes and is placed; the gang of two does not wake.
    assert view.seen[-1] == ["j"]
    assert [(c.job_id, c.worker_id) for c in cmds if isinstance(c, Assign)] == [("j", "w1")]
    assert core.jobs["gang"].state == JobState.PENDING


def test_a_new_worker_wakes_the_jobs_its_gpus_match() -> None:
    core, view = busy_core()
    core.handle(WorkerRegistered(3.0, "w4", "f1", "rig", "1", gpus("RTX 3060")))
    core.handle(SchedulePass(3.0))
    assert view.seen[-1] == []  # another model: nobody
    core.handle(WorkerRegistered(3.0, "w5", "f1", "rig", "1", gpus("RTX 3090", 2)))
    cmds = core.handle(SchedulePass(3.0))
    assert view.seen[-1] == ["j", "gang"]
    # j takes one of w5's two; the gang finds one left.
    assert [c.job_id for c in cmds if isinstance(c, Assign)] == ["j"]
    assert core.jobs["gang"].state == JobState.PENDING


def test_a_worker_leaving_refreshes_what_no_longer_fits_at_all() -> None:
    """Nothing freed, but the only rig wide enough for the gang drains: the gang's reason
    turns unresolvable, as a full pass would say."""
    core, view = busy_core()
    assert core.jobs["gang"].pending_reasons[0].resolvable
    core.handle(DrainRequested(3.0, "w3"))
    core.handle(SchedulePass(3.0))
    assert "gang" in view.seen[-1]
    reason = core.jobs["gang"].pending_reasons[0]
    assert (reason.resource, reason.resolvable) == ("gpu_count", False)


def test_a_curtailment_window_ending_wakes_every_job() -> None:
    view = SpyQueue()
    core = BrokerCore(lease_ttl_s=1e9, view=view)
    core.handle(WorkerRegistered(0.0, "w1", "f1", "rig", "1", gpus("RTX 3090")))
    core.handle(CurtailmentScheduled(0.0, Window("c1", "f1", 0.0, H, "peak")))
    core.handle(JobSubmitted(0.0, "j", "c", spec("RTX 3090")))
    core.handle(SchedulePass(0.0))
    assert [r.resource for r in core.jobs["j"].pending_reasons] == ["gpu_count", "curtailment"]
    core.handle(SchedulePass(1.0))
    assert view.seen[-1] == ["j"]  # a window is on: every job, every pass
    core.handle(Tick(H + 1))  # the window ends; the rig takes work again
    cmds = core.handle(SchedulePass(H + 1))
    assert view.seen[-1] == ["j"]
    assert [c.job_id for c in cmds if isinstance(c, Assign)] == ["j"]


# --- lockstep: parking against a full pass ------------------------------------------------


def _kinds(job) -> list[tuple[str, str, bool]]:
    return [(r.resource, r.requested, r.resolvable) for r in job.pending_reasons]


class ParkingLockstepMachine(CoreMachine):
    @initialize()
    def setup(self) -> None:
        super().setup()
        assert isinstance(self.core.view, ParkingQueue)
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
        assert [c for c in cmds if not isinstance(c, Persist)] == [
            c for c in expected if not isinstance(c, Persist)
        ]
        mine = [c for c in cmds if isinstance(c, Persist)]
        theirs = [c for c in expected if isinstance(c, Persist)]
        assert len(mine) <= len(theirs)
        if theirs:
            jobs = mine[0].job_ids if mine else frozenset()
            workers = mine[0].worker_ids if mine else frozenset()
            assert workers == theirs[0].worker_ids
            assert jobs <= theirs[0].job_ids
            for job_id in theirs[0].job_ids - jobs:  # only parked jobs' figures moved
                job, ref = self.core.jobs[job_id], self.ref.jobs[job_id]
                assert job.state == ref.state == JobState.PENDING
                assert _kinds(job) == _kinds(ref)
        return cmds

    @invariant()
    def same_kind_of_reasons(self) -> None:
        if not hasattr(self, "core"):
            return
        for job_id, job in self.core.jobs.items():
            ref = self.ref.jobs[job_id]
            assert (job.state, _kinds(job)) == (ref.state, _kinds(ref))


ParkingLockstepMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestParkingLockstep = ParkingLockstepMachine.TestCase
