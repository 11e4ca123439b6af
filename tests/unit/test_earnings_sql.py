"""Earnings read from the store (``Store.settled``: settled attempts streamed, payouts summed
in SQL) equal earnings read from a pure core (``CoreSettled``) for the same history: every
grouping, period and farm, the energy saved under power caps and the curtailment lines
included. And the broker's core (``keep_ledger=False``) keeps no ledger while the SQL
verify-ledger finds it whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.core import BrokerCore
from broker.earnings import earnings
from broker.economics import FarmTerms, PowerPolicy, TariffWindow
from broker.events import (
    AttemptFinished,
    AttemptStarted,
    CurtailmentScheduled,
    FarmConfigured,
    JobSubmitted,
    PostLedger,
    SchedulePass,
    WorkerRegistered,
    Writes,
)
from broker.invariants import validate_state
from broker.ledger import charges_of, ledger_problems, verify_ledger
from broker.model import GpuInfo, JobSpec, Tier
from broker.store import FarmRow, Store
from broker.windows import Window
from harness.broker_fixtures import healthy
from rigshift.power import PowerPoint

T0 = 1_800_000_000.0
CURVE = tuple(
    PowerPoint(w, f, d)
    for w, f, d in (
        (175, 38_517, 175),
        (210, 42_543, 210),
        (245, 45_674, 245),
        (280, 47_910, 280),
        (315, 49_252, 315),
        (350, 49_700, 340),
    )
)
TERMS = (
    FarmTerms(
        "fa",
        100_000,
        pue_permille=1200,
        broker_fee_permille=150,
        mining_micros_per_kwh=(("RTX 3090", 150_000), ("RTX 4090", 90_000)),
        tariff_windows=(TariffWindow(22, 6, 40_000),),
        power_policy=PowerPolicy.EFFICIENT,
        max_slowdown_percent=5,
        demand_response_micros_per_mwh=50_000_000,
    ),
    FarmTerms("fb", 70_000, mining_micros_per_kwh=(("RTX 3090", 120_000),)),
)


def gpu(i: int, model: str, price: int) -> GpuInfo:
    return GpuInfo(
        i, f"u{i}", model, 24576, 350, price, measurement=healthy(model, 24576),
        power_curve=CURVE, power_limit_settable=True,
    )  # fmt: skip


WORKERS = (
    ("w1", "fa", (gpu(0, "RTX 3090", 3_600_000), gpu(1, "RTX 4090", 3_600_000))),
    ("w2", "fa", (gpu(0, "RTX 3090", 1_800_000),)),
    ("w3", "fb", (gpu(0, "RTX 3090", 9_000_000), gpu(1, "RTX 3090", 9_000_000))),
)

jobs = st.lists(
    st.tuples(
        st.integers(1, 2),  # GPUs
        st.sampled_from([Tier.GUARANTEED, Tier.SPOT]),
        st.floats(0.001, 20_000.0, allow_nan=False),  # seconds it ran
        st.integers(0, 10_000_000),  # joules
        st.sampled_from([0, 0, 1]),  # exit code
    ),
    min_size=1,
    max_size=8,
)


def history(core: BrokerCore, plan) -> tuple[float, list]:
    """Run the plan through the core: each job placed, run and finished in turn."""
    cmds: list = []
    t = T0
    for terms in TERMS:
        cmds += core.handle(FarmConfigured(t, terms))
    for worker_id, farm_id, infos in WORKERS:
        cmds += core.handle(WorkerRegistered(t, worker_id, farm_id, worker_id, "1", infos))
    for n, (count, tier, seconds, joules, code) in enumerate(plan):
        job_id = f"j{n}"
        spec = JobSpec(command=("x",), gpu_count=count, tier=tier, allow_unverified=True)
        cmds += core.handle(JobSubmitted(t, job_id, "alice", spec))
        cmds += core.handle(SchedulePass(t))
        for a in core.jobs[job_id].attempts:
            cmds += core.handle(AttemptStarted(t, a.worker_id, job_id, a.number, 1))
            t += seconds
            cmds += core.handle(
                AttemptFinished(t, a.worker_id, job_id, a.number, 2, code, energy_joules=joules)
            )
        t += 1.0
    # A window after the work (one before it would keep undeclared jobs off the farm).
    window = Window("c1", "fa", t + 100, t + 10_000, "grid", False, t, "op")
    cmds += core.handle(CurtailmentScheduled(t, window))
    return t, cmds


def stored(core: BrokerCore, cmds: list, path: Path) -> Store:
    """A SQLite store holding what the commands asked to write."""
    store = Store(f"sqlite:///{path}")
    for farm_id in ("fa", "fb"):
        store.create_farm(
            FarmRow(id=farm_id, display_name=farm_id, enrollment_token_sha256=farm_id)
        )
    store.save(core, Writes.of(cmds))
    return store


@pytest.fixture
def db(tmp_path_factory: pytest.TempPathFactory):
    n = iter(range(10**6))
    base = tmp_path_factory.mktemp("earnings")
    return lambda: base / f"broker{next(n)}.db"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(plan=jobs, data=st.data())
def test_earnings_from_the_store_equal_earnings_from_the_core(db, plan, data):
    core = BrokerCore(lease_ttl_s=1e9)
    end, cmds = history(core, plan)
    validate_state(core)
    store = stored(core, cmds, db())
    try:
        settled = sum(a.settled for j in core.jobs.values() for a in j.attempts)
        assert settled > 0 or not any(j.attempts for j in core.jobs.values())
        ends = sorted(a.end_time for j in core.jobs.values() for a in j.attempts if a.end_time)
        since = data.draw(st.sampled_from([0.0, T0, *ends]))
        now = data.draw(st.sampled_from([float("inf"), end + 5_000, end]))
        for group_by in ("farm", "worker", "gpu"):
            for farm_id in ("", "fa", "fb"):
                kw = dict(farm_id=farm_id, since=since, group_by=group_by, now=now)
                assert earnings(core, source=store, **kw) == earnings(core, **kw)
    finally:
        store.close()


def test_a_core_without_a_ledger_settles_the_same_and_the_store_verifies_it(tmp_path: Path):
    plan = [(2, Tier.GUARANTEED, 3600.0, 2_000_000, 0), (1, Tier.SPOT, 60.0, 10_000, 1)]
    kept = BrokerCore(lease_ttl_s=1e9)
    _, _kept_cmds = history(kept, plan)
    lean = BrokerCore(lease_ttl_s=1e9, keep_ledger=False)
    _, cmds = history(lean, plan)
    posted = [e for c in cmds if isinstance(c, PostLedger) for e in c.entries]
    assert posted == kept.ledger and len(posted) == 6  # the same legs are emitted ...
    assert lean.ledger == []  # ... and none kept
    validate_state(lean)  # (its ledger part is the store's to check)
    store = stored(lean, cmds, tmp_path / "broker.db")
    try:
        problems, summary = verify_ledger(store)
        assert problems == ledger_problems(kept.ledger, charges_of(kept.jobs.values())) == []
        assert summary["entries"] == 6 and summary["settled_attempts"] == 2
        assert earnings(lean, source=store) == earnings(kept)
        by_gpu = earnings(lean, source=store, group_by="gpu")
        assert by_gpu == earnings(kept, group_by="gpu")
        assert any(r.energy_saved_joules for r in by_gpu)  # w2's capped attempt
        assert any(r.curtailed.demand_response_micros for r in by_gpu)  # fa's window
        assert sum(r.revenue_micros for r in by_gpu) > 0
        assert store.balances(["broker:fees"])["broker:fees"] > 0
    finally:
        store.close()
