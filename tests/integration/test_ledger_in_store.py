"""The broker keeps its ledger in the store only (docs/scale.md section 1): after settled
jobs its core holds no leg, verify-ledger (SQL) passes, earnings and metrics show the
money, and a restarted broker's metrics start from the store's totals."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from broker_harness import ManualClock, start_broker
from protocol_agent import ProtocolAgent, authed_channel, gpus

from broker.ledger import verify_ledger
from rigshift.v1 import farm_pb2, farm_service_pb2, job_pb2
from rigshift.v1 import farm_service_pb2_grpc as fsg
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg

State = job_pb2.Job.State
SERIES = (
    ("rigshift_farm_revenue_usd_total", {"farm": "nordic"}),
    ("rigshift_farm_energy_joules_total", {"farm": "nordic"}),
    ("rigshift_jobs", {"state": "succeeded", "tier": "guaranteed"}),
    ("rigshift_ledger_imbalance_micros", {}),
    ("rigshift_farm_mining_usd_per_kwh", {"farm": "nordic"}),
)


def wait(jobs, name, pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        job = jobs.GetJob(js.GetJobRequest(name=name))
        if pred(job) or time.monotonic() > deadline:
            return job
        time.sleep(0.02)


def values(broker) -> list[float | None]:
    registry = broker.broker.metrics.registry
    return [registry.get_sample_value(name, labels) for name, labels in SERIES]


def test_settled_jobs_leave_no_ledger_in_the_core_and_survive_in_the_store(tmp_path: Path):
    clock = ManualClock()
    b = start_broker(tmp_path / "b", clock, metrics_listen="127.0.0.1:0")
    with authed_channel(b.address) as ch:
        farms = fsg.FarmServiceStub(ch)
        farm = farms.CreateFarm(
            farm_service_pb2.CreateFarmRequest(
                farm=farm_pb2.Farm(
                    display_name="nordic",
                    tariff_micros_per_kwh=100_000,
                    mining_micros_per_kwh={"RTX 3090": 150_000},
                )
            )
        )
        agent = ProtocolAgent(b.address, farm.enrollment_token, gpus(1, price=3_600_000))
        agent.register()
        agent.connect()
        jobs = jsg.JobServiceStub(ch)
        for n in range(3):
            job = jobs.CreateJob(
                js.CreateJobRequest(spec=job_pb2.JobSpec(command=[f"x{n}"], gpu_count=1))
            )
            agent.next_of("assignment")
            agent.start(job.name, 1)
            clock.advance(1.0)  # 1 s at $3.60/h: 1,000 micro-dollars
            agent.finish(job.name, 1, energy=36_000)
            wait(jobs, job.name, lambda j: j.state == State.SUCCEEDED)
        (row,) = farms.GetEarnings(farm_service_pb2.GetEarningsRequest()).rows
        agent.close()
    core = b.broker.service.core
    assert core.keep_ledger is False and core.ledger == []
    problems, summary = verify_ledger(b.broker.store)
    assert problems == []
    assert (summary["settled_attempts"], summary["client_charges_micros"]) == (3, 3_000)
    assert row.revenue_micros == 3_000 - 3 * 100 and row.attempts == 3  # 10 % fee
    before = values(b)
    assert before[:4] == [row.revenue_micros / 1e6, 3 * 36_000, 3, 0]
    b.stop()
    assert snapshot(tmp_path / "b") is not None  # a clean stop left the metrics' totals
    again = start_broker(tmp_path / "b", metrics_listen="127.0.0.1:0")
    try:
        assert snapshot(tmp_path / "b") is None  # taken as it started: a crash leaves none
        assert again.broker.service.core.ledger == []
        assert values(again) == before  # the totals it left, not the core's memory
    finally:
        again.stop()
    with sqlite3.connect(tmp_path / "b" / "broker.db") as db:
        db.execute("DELETE FROM metric_snapshots")  # as after a crash
    summed = start_broker(tmp_path / "b", metrics_listen="127.0.0.1:0")
    try:
        assert values(summed) == before  # summed from the tables, to the same figures
    finally:
        summed.stop()


def snapshot(home: Path) -> str | None:
    with sqlite3.connect(home / "broker.db") as db:
        row = db.execute("SELECT figures_json FROM metric_snapshots").fetchone()
    return None if row is None else str(row[0])
