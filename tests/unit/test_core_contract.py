"""The core's contract beyond single events: what leaves it (assignments, quotes), and
that its reads change nothing. (That importing it loads no transport or database is
``tests/integration/test_core_imports.py``: it starts a process.)"""

from __future__ import annotations

from pathlib import Path

from broker.convert import assignment_pb
from broker.core import BrokerCore
from broker.economics import FarmTerms
from broker.events import (
    Assign,
    AttemptCheckpointed,
    AttemptStarted,
    CancelRequested,
    FarmConfigured,
    JobSubmitted,
    SchedulePass,
    WorkerRegistered,
)
from broker.model import GpuInfo, JobSpec, Tier
from broker.records import Quote
from broker.scheduler import Rejection
from harness.broker_fixtures import healthy

ROOT = Path(__file__).resolve().parents[2]


def gpus(n: int, price: int = 300_000, model: str = "RTX 3090") -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(i, f"u{i}", model, 24576, 350, price, measurement=healthy(model, 24576))
        for i in range(n)
    )


def test_assignments_repeat_the_assign_with_the_latest_checkpoint():
    core = BrokerCore(lease_ttl_s=1e9)
    core.handle(WorkerRegistered(0.0, "w1", "f", "rig", "1", gpus(2)))
    spec = JobSpec(command=("train",), inputs=(("data", "d" * 64),))
    core.handle(JobSubmitted(0.0, "j1", "alice", spec))
    core.handle(JobSubmitted(0.0, "j2", "alice", spec))
    cmds = core.handle(SchedulePass(0.0))
    first = Assign("w1", "j1", 1, (0,), spec, 300_000)
    assert first in cmds
    core.handle(AttemptStarted(1.0, "w1", "j1", 1, 1))
    core.handle(AttemptCheckpointed(2.0, "w1", "j1", 1, 2, sha256="ab" * 32))
    core.handle(CancelRequested(3.0, "j2"))  # its GPU is held until the agent confirms
    assert core.assignments("w1") == (
        Assign("w1", "j1", 1, (0,), spec, 300_000, checkpoint_sha256="ab" * 32),
    )


def test_the_assignment_message_is_built_from_the_command_alone():
    spec = JobSpec(
        command=("python", "train.py"),
        env=(("A", "1"),),
        working_dir_sha256="w" * 64,
        max_duration_seconds=60,
        python_requirements="numpy\n",
        requirements_sha256="r" * 64,
        inputs=(("data", "d" * 64),),
    )
    msg = assignment_pb(Assign("w1", "j1", 2, (1, 3), spec, 5, "c" * 64), max_output_bytes=9)
    assert (msg.job, msg.attempt, list(msg.gpu_indices)) == ("jobs/j1", 2, [1, 3])
    assert msg.checkpoint_sha256 == "c" * 64
    assert list(msg.spec.command) == ["python", "train.py"]
    assert dict(msg.spec.env) == {"A": "1"} and dict(msg.spec.inputs) == {"data": "d" * 64}
    assert (msg.spec.working_dir_sha256, msg.spec.max_duration_seconds) == ("w" * 64, 60)
    assert (msg.spec.python_requirements, msg.spec.requirements_sha256) == ("numpy\n", "r" * 64)
    assert msg.spec.max_output_bytes == 9


def quoted_fleet() -> BrokerCore:
    """w-cheap: 2 GPUs at $0.30/h, one busy; w-dear: 4 GPUs at $0.50/h, farm "f" whose
    floor for an RTX 3090 is 0.35 kW x $1.00/kWh = $0.35/h (above the 60% spot pays)."""
    core = BrokerCore(lease_ttl_s=1e9)
    core.handle(FarmConfigured(0.0, FarmTerms("f", tariff_micros_per_kwh=1_000_000)))
    core.handle(WorkerRegistered(0.0, "w-cheap", "g", "rig", "1", gpus(2, 300_000)))
    core.handle(WorkerRegistered(0.0, "w-dear", "f", "rig", "1", gpus(4, 500_000)))
    core.handle(JobSubmitted(0.0, "busy", "c", JobSpec(command=("x",))))
    core.handle(SchedulePass(0.0))
    return core


def test_quote_answers_from_the_kept_index_with_the_placement_filters():
    core = quoted_fleet()
    any_gpu = core.quote(JobSpec(command=("x",), gpu_count=2))
    assert any_gpu == Quote(6, 5, 300_000, 500_000, True, (), any_gpu.groups)
    assert [(g.price_micros_per_gpu_hour, g.gpus, g.free_gpus) for g in any_gpu.groups] == [
        (300_000, 2, 1),
        (500_000, 4, 4),
    ]
    capped = core.quote(JobSpec(command=("x",), max_price_micros_per_gpu_hour=400_000))
    assert (capped.matching_gpus, capped.free_matching_gpus) == (2, 1)
    # spot: 60% of the ask, never under the farm's floor: w-cheap 180,000 (no terms),
    # w-dear max(300,000, 350,000) = 350,000
    spot = core.quote(JobSpec(command=("x",), tier=Tier.SPOT))
    assert (spot.min_price_micros_per_gpu_hour, spot.max_price_micros_per_gpu_hour) == (
        180_000,
        350_000,
    )
    wide = core.quote(JobSpec(command=("x",), gpu_count=5))
    assert not wide.placeable_now
    assert wide.reasons == (
        Rejection(
            "gpu_count",
            "5 x GPU",
            "4",
            False,
            "no worker has 5 free GPUs: best has 4, and none has more than 4 in total",
        ),
    )
    none = core.quote(JobSpec(command=("x",), gpu_model="A4000"))
    assert (none.matching_gpus, none.placeable_now) == (0, False)
    assert none.reasons[0].resource == "gpu_model"


def test_a_quote_changes_nothing():
    core, twin = quoted_fleet(), quoted_fleet()
    for _ in range(3):
        core.quote(JobSpec(command=("x",), gpu_count=4))
    spec = JobSpec(command=("x",), gpu_count=4)
    core.handle(JobSubmitted(1.0, "j", "c", spec))
    twin.handle(JobSubmitted(1.0, "j", "c", spec))
    assert core.handle(SchedulePass(1.0)) == twin.handle(SchedulePass(1.0))
