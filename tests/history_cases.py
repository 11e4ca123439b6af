"""Broker histories for the store's SQL aggregates (earnings, the metrics' totals), shared
by the SQLite tests (tests/unit/test_earnings_sql.py) and the PostgreSQL ones
(tests/integration/test_ledger_sql_postgres.py).

Import it as ``from history_cases import history, stored`` (tests/ is on sys.path).
Two farms: fa (time-of-use tariff, EFFICIENT power caps, mining figures for two models,
demand response) and fb (plain); jobs placed, run and finished in turn (``history``), then
a curtailed spot job and a guaranteed one whose rig goes silent (``troubles``).
"""

from __future__ import annotations

from hypothesis import strategies as st
from sqlmodel import SQLModel

from broker.core import BrokerCore
from broker.economics import FarmTerms, PowerPolicy, TariffWindow
from broker.events import (
    AttemptFinished,
    AttemptStarted,
    CurtailmentScheduled,
    FarmConfigured,
    JobSubmitted,
    SchedulePass,
    Tick,
    WorkerRegistered,
    Writes,
)
from broker.metrics_tally import Tally
from broker.model import GpuInfo, JobSpec, Tier
from broker.store import FarmRow, Store
from broker.windows import Window
from harness.broker_fixtures import healthy
from rigshift.power import PowerPoint

__all__ = ["T0", "figures", "history", "jobs", "stored", "troubles"]

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


def stored(core: BrokerCore, cmds: list, url: str, *, create: bool) -> Store:
    """A store at ``url`` holding (only) what the commands asked to write. ``create``: make
    the schema (else it is there already: every table is emptied, examples stay fast)."""
    store = Store(url, create=create)
    if not create:
        with store.engine.begin() as conn:
            for table in reversed(SQLModel.metadata.sorted_tables):
                conn.execute(table.delete())
    for farm_id in ("fa", "fb"):
        store.create_farm(
            FarmRow(id=farm_id, display_name=farm_id, enrollment_token_sha256=farm_id)
        )
    store.save(core, Writes.of(cmds))
    return store


def troubles(core: BrokerCore, t: float) -> list:
    """After ``history``: a short spot job on farm fa stopped by fa's window, and a
    guaranteed job on fb whose rig goes silent: SLA events, a credit, requeues."""
    cmds: list = []
    gold = JobSpec(command=("x",), gpu_count=2, allow_unverified=True)
    cmds += core.handle(JobSubmitted(t, "gold", "bob", gold))
    spot = JobSpec(command=("x",), tier=Tier.SPOT, allow_unverified=True, max_duration_seconds=5)
    cmds += core.handle(JobSubmitted(t, "spot", "bob", spot))
    cmds += core.handle(SchedulePass(t))
    (a,) = core.jobs["spot"].attempts
    assert core.workers[a.worker_id].farm_id == "fa"
    cmds += core.handle(AttemptStarted(t, a.worker_id, "spot", 1, 1))
    (b,) = core.jobs["gold"].attempts
    cmds += core.handle(AttemptStarted(t, b.worker_id, "gold", 1, 1))
    core.workers[b.worker_id].lease_expires_at = t + 50  # its rig went silent at t
    cmds += core.handle(Tick(t + 100))  # fa's window is on; gold's rig lost its lease
    cmds += core.handle(AttemptFinished(t + 101, a.worker_id, "spot", 1, 2, -15, 12_345))
    return cmds


def figures(tally: Tally) -> tuple:
    return (
        tally.finished,
        tally.energy,
        tally.models,
        tally.sla,
        tally.credits,
        tally.curtailed,
        tally.ledger_sum,
        tally.payouts,
    )
