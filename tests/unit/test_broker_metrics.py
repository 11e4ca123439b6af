"""broker.metrics against the pure core: registry values after events, bounded labels.

Events go through the core exactly as ``BrokerService.apply`` feeds them, then
through ``BrokerMetrics.observe``; values are read with ``get_sample_value``.
"""

from __future__ import annotations

import enum
from dataclasses import replace
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from broker.core import BrokerCore
from broker.earnings import earnings, mining_usd_per_kwh
from broker.economics import FarmTerms, LedgerEntry
from broker.events import (
    Assign,
    AttemptFinished,
    AttemptProgress,
    AttemptStarted,
    CancelRequested,
    DrainRequested,
    FarmConfigured,
    GpuHealth,
    GpuHealthReported,
    Heartbeat,
    JobSubmitted,
    SchedulePass,
    Tick,
    WorkerRegistered,
)
from broker.metrics import (
    ALLOWED_LABELS,
    SLA_EVENT_KINDS,
    BrokerMetrics,
    FarmNames,
    sd_targets,
    tier_of,
)
from broker.model import GpuInfo, JobSpec
from harness.broker_fixtures import healthy
from rigshift.scoring import Measurement

TTL = 15.0
FARMS = {"f1": "Farm A", "f2": "Farm B"}


def gpus(n: int, model: str = "RTX 3090", price: int = 300_000, start: int = 0):
    return tuple(
        GpuInfo(i, f"SIM-{i}", model, 24576, 350, price, measurement=healthy(model, 24576))
        for i in range(start, start + n)
    )


def spec(gpu_count: int = 1, **kw) -> JobSpec:
    return JobSpec(command=("python", "train.py"), gpu_count=gpu_count, **kw)


class Harness:
    """A core, its metrics and a clock; ``apply`` does what the shell does for metrics."""

    def __init__(self) -> None:
        self.now = 0.0
        self.core = BrokerCore(lease_ttl_s=TTL)
        self.registry = CollectorRegistry()
        self.metrics = BrokerMetrics(
            self.core, self.registry, farm_name=FARMS.get, clock=lambda: self.now
        )

    def apply(self, event, elapsed_s: float = 0.001):
        self.now = max(self.now, event.now)
        cmds = self.core.handle(event)
        self.metrics.observe(event, cmds, elapsed_s)
        return cmds

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


@pytest.fixture
def h() -> Harness:
    h = Harness()
    h.apply(WorkerRegistered(0.0, "w1", "f1", "rig-1", "1.0", gpus(2), "rig-1:9400"))
    return h


def test_submission_placement_and_success(h: Harness):
    h.apply(JobSubmitted(10.0, "j1", "alice", spec(2)))
    h.apply(JobSubmitted(11.0, "j2", "alice", spec(1)))
    cmds = h.apply(SchedulePass(15.0), elapsed_s=0.002)
    assert [c.job_id for c in cmds if isinstance(c, Assign)] == ["j1"]  # j2 waits: no GPU left
    assert h.value("rigshift_jobs_submitted_total", tier="guaranteed") == 2
    assert h.value("rigshift_placements_total", gpu_model="RTX 3090", tier="guaranteed") == 1
    # Queue wait: PENDING at 10 s, SCHEDULED at 15 s.
    assert h.value("rigshift_job_queue_wait_seconds_count", tier="guaranteed") == 1
    assert h.value("rigshift_job_queue_wait_seconds_sum", tier="guaranteed") == 5.0
    assert h.value("rigshift_job_queue_wait_seconds_bucket", tier="guaranteed", le="5.0") == 1
    assert h.value("rigshift_job_queue_wait_seconds_bucket", tier="guaranteed", le="1.0") == 0
    assert h.value("rigshift_scheduling_pass_duration_seconds_count") == 1
    assert h.value("rigshift_scheduling_pass_duration_seconds_sum") == 0.002
    assert h.value("rigshift_gpus", farm="Farm A", gpu_model="RTX 3090", state="allocated") == 2
    assert h.value("rigshift_gpus", farm="Farm A", gpu_model="RTX 3090", state="free") == 0
    assert h.value("rigshift_jobs", state="scheduled", tier="guaranteed") == 1
    assert h.value("rigshift_jobs", state="pending", tier="guaranteed") == 1

    h.apply(AttemptStarted(20.0, "w1", "j1", 1, 1))
    h.apply(AttemptProgress(30.0, "w1", "j1", 1, 2, energy_joules=1_000))
    # Energy and revenue count when the attempt settles, so that revenue per kWh adds up.
    assert h.value("rigshift_farm_energy_joules_total", farm="Farm A") == 0
    assert h.value("rigshift_farm_revenue_usd_total", farm="Farm A") == 0
    h.apply(AttemptFinished(3620.0, "w1", "j1", 1, 3, exit_code=0, energy_joules=2_520_000))

    assert h.value("rigshift_jobs_completed_total", state="succeeded", tier="guaranteed") == 1
    assert h.value("rigshift_jobs", state="succeeded", tier="guaranteed") == 1
    assert h.value("rigshift_farm_energy_joules_total", farm="Farm A") == 2_520_000
    # One hour on 2 GPUs at $0.30 per GPU-hour: charge 7 200 000 GPU-ms x 300 000 / 3 600 000
    # = 600 000 micro-dollars; the farm's payout is that minus the broker fee (10 %).
    assert h.core.jobs["j1"].attempts[0].price_micros_per_gpu_hour == 300_000
    assert h.core.default_fee_permille == 100
    assert h.value("rigshift_farm_revenue_usd_total", farm="Farm A") == 0.54
    assert h.value("rigshift_ledger_imbalance_micros") == 0
    # j2 has been pending since 11 s; the collector reads the clock at scrape time.
    h.now = 3700.0
    assert h.value("rigshift_job_queue_oldest_wait_seconds", tier="guaranteed") == 3689.0
    assert h.value("rigshift_job_queue_oldest_wait_seconds", tier="spot") == 0


def test_failure_cancel_and_requeue_after_lease_expiry(h: Harness):
    h.apply(JobSubmitted(1.0, "j1", "alice", spec(1)))
    h.apply(JobSubmitted(1.0, "j2", "alice", spec(1, max_attempts=1)))
    h.apply(SchedulePass(2.0))
    h.apply(AttemptStarted(3.0, "w1", "j1", 1, 1))
    h.apply(AttemptFinished(4.0, "w1", "j1", 1, 2, exit_code=3))
    assert h.value("rigshift_jobs_completed_total", state="failed", tier="guaranteed") == 1

    h.apply(JobSubmitted(5.0, "j3", "alice", spec(1)))
    h.apply(SchedulePass(6.0))
    # w1's lease runs out: j2 (1 attempt) fails, j3 is requeued.
    h.apply(Tick(0.0 + TTL + 1))
    assert h.value("rigshift_worker_lease_expirations_total", farm="Farm A") == 1
    assert h.value("rigshift_jobs_requeued_total", tier="guaranteed") == 1
    assert h.value("rigshift_jobs_completed_total", state="failed", tier="guaranteed") == 2
    assert h.value("rigshift_workers", farm="Farm A", state="offline") == 1
    assert h.value("rigshift_workers", farm="Farm A", state="online") == 0
    assert h.value("rigshift_gpus", farm="Farm A", gpu_model="RTX 3090", state="unavailable") == 2

    h.apply(CancelRequested(20.0, "j3"))
    assert h.value("rigshift_jobs_completed_total", state="cancelled", tier="guaranteed") == 1
    assert h.value("rigshift_jobs", state="cancelled", tier="guaranteed") == 1


def test_workers_gpus_and_power_by_farm_and_state(h: Harness):
    h.apply(WorkerRegistered(1.0, "w2", "f2", "rig-2", "1.0", gpus(3, "RTX 3060"), ""))
    h.apply(DrainRequested(2.0, "w2"))
    h.apply(Heartbeat(3.0, "w1"))
    assert h.value("rigshift_workers", farm="Farm A", state="online") == 1
    assert h.value("rigshift_workers", farm="Farm B", state="draining") == 1
    assert h.value("rigshift_gpus", farm="Farm B", gpu_model="RTX 3060", state="unavailable") == 3
    assert h.value("rigshift_farm_gpu_power_limit_watts", farm="Farm B") == 3 * 350
    assert h.value("rigshift_farm_mining_usd_per_kwh", farm="Farm B") == 0
    assert h.value("rigshift_ledger_imbalance_micros") == 0
    assert h.value("rigshift_worker_lease_expirations_total", farm="Farm B") == 0


def test_sla_events_and_credits_by_kind(h: Harness):
    for kind in SLA_EVENT_KINDS:
        assert h.value("rigshift_sla_events_total", kind=kind) == 0
        assert h.value("rigshift_sla_credits_usd_total", kind=kind) == 0
    h.apply(JobSubmitted(1.0, "j1", "alice", spec(1)))
    h.apply(SchedulePass(2.0))
    h.apply(AttemptStarted(3.0, "w1", "j1", 1, 1))
    h.apply(Heartbeat(8.0, "w1"))
    h.apply(Tick(8.0 + TTL + 1))  # the lease runs out while the job runs
    assert h.value("rigshift_sla_events_total", kind="interruption") == 1
    assert h.value("rigshift_sla_events_total", kind="lost_work") == 1
    assert h.value("rigshift_sla_events_total", kind="heartbeat_gap") == 1
    assert h.value("rigshift_sla_events_total", kind="start_deadline_missed") == 0
    credits = sum(e.credit_micros for e in h.core.jobs["j1"].sla_events) / 1e6
    assert credits > 0  # a guaranteed job is credited its lost work
    assert h.value("rigshift_sla_credits_usd_total", kind="lost_work") == pytest.approx(credits)


def test_ledger_imbalance_is_the_sum_of_all_entries(h: Harness):
    assert h.value("rigshift_ledger_imbalance_micros") == 0
    h.core.ledger.append(LedgerEntry("bad", "farm:f1", 5, "payout", "j", 1, 1.0))
    assert h.value("rigshift_ledger_imbalance_micros") == 5
    assert h.value("rigshift_farm_revenue_usd_total", farm="Farm A") == 0.000005
    h.core.ledger.clear()  # a reload replaces the ledger: tallied again from the start
    assert h.value("rigshift_ledger_imbalance_micros") == 0


def test_mining_alternative_is_energy_weighted_like_earnings(h: Harness):
    """The gauge is broker.earnings.mining_usd_per_kwh over the energy the farm counts in
    rigshift_farm_energy_joules: the same figure as GetEarnings' farm row."""

    def gauge() -> float | None:
        return h.value("rigshift_farm_mining_usd_per_kwh", farm="Farm A")

    def earnings_row() -> float:
        (row,) = [r for r in earnings(h.core, group_by="farm") if r.farm_id == "f1"]
        return row.mining_usd_per_kwh

    assert gauge() == 0  # not configured (and no earnings row: the core knows no terms)
    mining = (("RTX 3090", 200_000), ("RTX 3060", 100_000))
    h.apply(FarmConfigured(1.0, FarmTerms("f1", mining_micros_per_kwh=mining)))
    assert gauge() == pytest.approx(0.15) == earnings_row()  # no energy yet: the table's mean
    rtx3060 = (GpuInfo(0, "u", "RTX 3060", 12288, 150, 300_000, measurement=healthy("RTX 3060")),)
    h.apply(WorkerRegistered(2.0, "w2", "f1", "rig-2", "1.0", rtx3060, ""))
    h.apply(JobSubmitted(3.0, "j1", "alice", spec(2, gpu_model="RTX 3090")))
    h.apply(JobSubmitted(3.0, "j2", "alice", spec(1, gpu_model="RTX 3060")))
    h.apply(SchedulePass(4.0))
    h.apply(AttemptStarted(5.0, "w1", "j1", 1, 1))
    h.apply(AttemptStarted(5.0, "w2", "j2", 1, 1))
    h.apply(AttemptFinished(6.0, "w1", "j1", 1, 2, exit_code=0, energy_joules=2_000_000))
    h.apply(AttemptFinished(6.0, "w2", "j2", 1, 2, exit_code=0, energy_joules=1_000_000))
    assert h.value("rigshift_farm_energy_joules_total", farm="Farm A") == 3_000_000
    # Energy-weighted: (2 000 000 J x $0.20 + 1 000 000 J x $0.10) / 3 000 000 J = $0.1667;
    # weighting by power limits instead would give (700 W x 0.20 + 150 W x 0.10) / 850 W.
    assert gauge() == pytest.approx((2_000_000 * 0.2 + 1_000_000 * 0.1) / 3_000_000)
    assert gauge() == earnings_row()
    h.apply(Tick(100.0))  # every worker offline: the energy, and so the figure, stays
    assert gauge() == pytest.approx(0.5 / 3) == earnings_row()


def test_mining_per_kwh_weights_each_kwh_by_its_gpu_model():
    terms = FarmTerms("f", mining_micros_per_kwh=(("RTX 3090", 200_000), ("RTX 3060", 90_000)))
    assert mining_usd_per_kwh(None, {"RTX 3090": 1}) == 0
    assert mining_usd_per_kwh(FarmTerms("f"), {"RTX 3090": 1}) == 0  # no mining table
    assert mining_usd_per_kwh(terms, {}) == pytest.approx(0.145)  # no energy: the mean
    assert mining_usd_per_kwh(terms, {"RTX 3090": 0}) == pytest.approx(0.145)
    assert mining_usd_per_kwh(terms, {"RTX 3090": 3_600_000}) == pytest.approx(0.2)
    # 1 kWh at $0.20 + 3 kWh at $0.09 + 1 kWh of a model without a figure ($0) = $0.47 / 5 kWh
    kwh = 3_600_000
    mixed = {"RTX 3090": kwh, "RTX 3060": 3 * kwh, "A100": kwh}
    assert mining_usd_per_kwh(terms, mixed) == pytest.approx(0.47 / 5)


def test_sd_lists_online_and_draining_workers_with_an_address(h: Harness):
    mixed = gpus(2, "RTX 3090", start=0) + gpus(1, "A4000", start=2)
    h.apply(WorkerRegistered(1.0, "w2", "f2", "rig-2", "1.0", mixed, "10.0.0.2:9400"))
    h.apply(WorkerRegistered(1.0, "w3", "f2", "rig-3", "1.0", gpus(1), ""))  # no exporter
    h.apply(WorkerRegistered(1.0, "w4", "f2", "rig-4", "1.0", gpus(1, "A4000"), "10.0.0.4:9400"))
    h.apply(DrainRequested(2.0, "w2"))
    for w in ("w1", "w2", "w3"):
        h.apply(Heartbeat(10.0, w))
    h.apply(Tick(TTL + 2.0))  # w4 never renewed: offline, so not a target
    assert sd_targets(h.core, FARMS.__getitem__) == [
        {"targets": ["rig-1:9400"], "labels": {"farm": "Farm A", "gpu_model": "RTX 3090"}},
        {"targets": ["10.0.0.2:9400"], "labels": {"farm": "Farm B", "gpu_model": "RTX 3090"}},
    ]


class _Tier(enum.Enum):
    SPOT = 2


@pytest.mark.parametrize(
    ("tier", "label"),
    [
        (None, "guaranteed"),  # JobSpec without a tier (before economics land)
        ("GUARANTEED", "guaranteed"),
        ("SPOT", "spot"),
        ("TIER_SPOT", "spot"),
        (_Tier.SPOT, "spot"),
        ("something-new", "guaranteed"),  # never an unbounded label value
    ],
)
def test_tier_label(tier, label):
    spec_ = SimpleNamespace() if tier is None else SimpleNamespace(tier=tier)
    assert tier_of(SimpleNamespace(spec=spec_)) == label


def test_observe_never_raises(h: Harness, caplog):
    assign = Assign("no-such-worker", "j", 1, (0,), JobSpec(command=("x",)), 0)
    h.metrics.observe(SchedulePass(1.0), [assign], 0.0)
    assert "cannot observe" in caplog.text


def test_no_series_carries_an_unbounded_label(h: Harness):
    """Many jobs and workers later, every label is a bounded one and no value is an id."""
    ids: set[str] = set()
    for w in range(20):
        wid = f"worker-{w:04d}"
        ids.add(wid)
        h.apply(WorkerRegistered(1.0, wid, f"f{1 + w % 2}", f"host-{w}", "1.0", gpus(2), ""))
    for j in range(60):
        jid = f"job-{j:04d}"
        ids.add(jid)
        h.apply(JobSubmitted(2.0, jid, "alice", spec(1)))
    for cmd in h.apply(SchedulePass(3.0)):
        if isinstance(cmd, Assign):
            h.apply(AttemptStarted(4.0, cmd.worker_id, cmd.job_id, 1, 1))
            h.apply(AttemptFinished(9.0, cmd.worker_id, cmd.job_id, 1, 2, energy_joules=10))
    h.apply(SchedulePass(10.0))
    h.apply(Tick(100.0))
    names = set()
    for family in h.registry.collect():
        for sample in family.samples:
            names.add(sample.name)
            assert set(sample.labels) <= ALLOWED_LABELS, sample
            assert not ids & set(sample.labels.values()), sample
            assert sample.name.startswith("rigshift_"), sample
    # The series are per label value, not per job or worker: a few dozen at most.
    assert len(names) < 60
    total = sum(len(f.samples) for f in h.registry.collect())
    assert total < 200, total


def test_farm_names_follow_a_rename_within_the_ttl():
    names, now = {"f1": "Farm A"}, [0.0]
    lookups = []

    def lookup(farm_id: str) -> str:
        lookups.append(farm_id)
        if farm_id not in names:
            raise KeyError(farm_id)
        return names[farm_id]

    farm_name = FarmNames(lookup, ttl_s=60.0, clock=lambda: now[0])
    assert farm_name("f1") == "Farm A"
    names["f1"] = "Farm A2"
    now[0] = 59.0
    assert farm_name("f1") == "Farm A"  # cached
    now[0] = 61.0
    assert farm_name("f1") == "Farm A2"
    assert farm_name("gone") == "gone"  # unknown: labelled by its id
    assert lookups == ["f1", "f1", "gone"]


def test_quarantined_and_unverified_gpus_per_farm(h: Harness):
    honest = Measurement(49_700, 24_920, usable_vram_mb=24_000)  # an RTX 3090's reference
    figures = (honest, Measurement(16_566, 8_306, usable_vram_mb=24_000), None)
    rig = tuple(replace(g, measurement=m) for g, m in zip(gpus(3), figures, strict=True))
    h.apply(WorkerRegistered(1.0, "w2", "f2", "rig-2", "1.0", rig))
    labels = {"farm": "Farm B", "gpu_model": "RTX 3090"}
    # the impostor (a third of the figures) and the unmeasured GPU
    assert h.value("rigshift_gpus_unverified", **labels) == 2
    # the fixture's GPUs register with healthy figures: verified
    assert h.value("rigshift_gpus_unverified", farm="Farm A", gpu_model="RTX 3090") == 0
    assert h.value("rigshift_gpus", **labels, state="quarantined") == 0
    assert h.value("rigshift_gpus", **labels, state="free") == 3
    h.apply(GpuHealthReported(3.0, "w2", (GpuHealth(0, quarantined=True, reason="XID 79"),)))
    assert h.value("rigshift_gpus", **labels, state="quarantined") == 1
    assert h.value("rigshift_gpus", **labels, state="free") == 2
    h.apply(GpuHealthReported(4.0, "w2", ()))
    assert h.value("rigshift_gpus", **labels, state="quarantined") == 0
