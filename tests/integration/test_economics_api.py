"""Money over the real API: floors, asks, settlement, spot preemption, SLA credits, earnings."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from broker_harness import ManualClock, start_broker
from google.protobuf import field_mask_pb2
from protocol_agent import ProtocolAgent, authed_channel, gpus

from broker.economics import charge_micros
from broker.ledger import verify_ledger
from broker.store import Store
from rigshift.v1 import farm_pb2, farm_service_pb2, job_pb2
from rigshift.v1 import farm_service_pb2_grpc as fsg
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg
from rigshift.v1 import worker_service_pb2 as ws

State = job_pb2.Job.State


@pytest.fixture
def clock() -> ManualClock:
    """The broker's clock: billed time passes when a test advances it, not by sleeping."""
    return ManualClock()


@pytest.fixture
def rb(tmp_path: Path, clock: ManualClock):
    b = start_broker(
        tmp_path / "b", clock, lease_ttl_s=3.0, heartbeat_interval_s=0.5, start_deadline_s=0.5
    )
    yield b
    b.stop()


@pytest.fixture
def stubs(rb):
    with authed_channel(rb.address) as ch:
        yield jsg.JobServiceStub(ch), fsg.FarmServiceStub(ch)


def make_farm(farms, **economics) -> farm_pb2.Farm:
    return farms.CreateFarm(
        farm_service_pb2.CreateFarmRequest(farm=farm_pb2.Farm(display_name="nordic", **economics))
    )


def wait(jobs, name, pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        job = jobs.GetJob(js.GetJobRequest(name=name))
        if pred(job) or time.monotonic() > deadline:
            return job
        time.sleep(0.02)


def test_floor_prices_and_asks_under_the_floor(stubs):
    _, farms = stubs
    # 350 W x $0.10/kWh x PUE 1.2 = $0.042/h; mining 350 W x $0.20/kWh = $0.070/h; + $0.01 margin
    farm = make_farm(
        farms,
        tariff_micros_per_kwh=100_000,
        pue_permille=1200,
        mining_micros_per_kwh={"RTX 3090": 200_000},
        margin_micros_per_gpu_hour=10_000,
    )
    (floor,) = farm.floors
    assert (floor.gpu_model, floor.watts) == ("RTX 3090", 350)
    assert floor.energy_cost_micros_per_gpu_hour == 42_000
    assert floor.mining_micros_per_gpu_hour == 70_000
    assert floor.floor_micros_per_gpu_hour == 80_000
    with pytest.raises(grpc.RpcError) as exc:
        farms.UpdateFarm(
            farm_service_pb2.UpdateFarmRequest(
                farm=farm_pb2.Farm(name=farm.name, ask_micros_per_gpu_hour={"RTX 3090": 79_999}),
                update_mask=field_mask_pb2.FieldMask(paths=["ask_micros_per_gpu_hour"]),
            )
        )
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "under the floor $0.080000" in exc.value.details()
    ok = farms.UpdateFarm(
        farm_service_pb2.UpdateFarmRequest(
            farm=farm_pb2.Farm(name=farm.name, ask_micros_per_gpu_hour={"RTX 3090": 90_000}),
            update_mask=field_mask_pb2.FieldMask(paths=["ask_micros_per_gpu_hour"]),
        )
    )
    assert ok.ask_micros_per_gpu_hour["RTX 3090"] == 90_000
    assert ok.tariff_micros_per_kwh == 100_000  # not in the mask: unchanged
    with pytest.raises(grpc.RpcError) as exc:
        farms.UpdateFarm(
            farm_service_pb2.UpdateFarmRequest(
                farm=farm_pb2.Farm(name=farm.name),
                update_mask=field_mask_pb2.FieldMask(paths=["enrollment_token"]),
            )
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_attempt_is_charged_settled_once_and_shows_in_earnings(rb, stubs, clock):
    jobs, farms = stubs
    farm = make_farm(
        farms,
        tariff_micros_per_kwh=100_000,
        broker_fee_permille=200,
        mining_micros_per_kwh={"RTX 3090": 150_000},
        ask_micros_per_gpu_hour={"RTX 3090": 3_600_000},  # $3.60/h = 1000 micros per GPU-second
    )
    agent = ProtocolAgent(rb.address, farm.enrollment_token, gpus(2, price=1))
    agent.register()
    agent.connect()
    workers = farms.ListWorkers(farm_service_pb2.ListWorkersRequest()).workers
    assert workers[0].gpus[0].price_micros_per_gpu_hour == 3_600_000  # the farm's ask wins
    assert workers[0].reliability_permille == 1000
    job = jobs.CreateJob(js.CreateJobRequest(spec=job_pb2.JobSpec(command=["t"], gpu_count=2)))
    a = agent.next_of("assignment")
    agent.start(a.job, 1)
    clock.advance(0.5)
    agent.finish(a.job, 1, energy=360_000)  # 0.1 kWh
    done = wait(jobs, job.name, lambda j: j.state == State.SUCCEEDED)
    attempt = done.attempts[0]
    # 2 GPUs x 0.5 s = 1000 GPU-ms at 1000 micros per GPU-second -> 1000 micros
    assert (attempt.gpu_milliseconds, attempt.charge_micros) == (1000, 1000)
    assert done.cost_micros == attempt.charge_micros
    rows = farms.GetEarnings(farm_service_pb2.GetEarningsRequest()).rows
    (row,) = rows
    fee = attempt.charge_micros * 200 // 1000
    assert row.revenue_micros == attempt.charge_micros - fee
    assert row.energy_joules == 360_000
    assert row.energy_cost_micros == 10_000  # 0.1 kWh x $0.10
    assert row.margin_micros == row.revenue_micros - 10_000
    assert row.mining_usd_per_kwh == pytest.approx(0.15)
    by_gpu = farms.GetEarnings(
        farm_service_pb2.GetEarningsRequest(group_by=farm_service_pb2.GetEarningsRequest.GPU)
    ).rows
    assert len(by_gpu) == 2
    assert sum(r.revenue_micros for r in by_gpu) == row.revenue_micros
    store = Store(rb.broker.store.url)
    problems, summary = verify_ledger(store)
    store.close()
    assert problems == []
    assert summary["settled_attempts"] == 1
    agent.close()


def test_spot_job_is_preempted_resumes_from_checkpoint_and_pays_only_what_ran(rb, stubs, clock):
    jobs, farms = stubs
    farm = make_farm(farms)
    agent = ProtocolAgent(rb.address, farm.enrollment_token, gpus(1, price=1_000_000))
    agent.register()
    agent.connect()
    spot = jobs.CreateJob(
        js.CreateJobRequest(spec=job_pb2.JobSpec(command=["s"], gpu_count=1, tier=job_pb2.SPOT))
    )
    a = agent.next_of("assignment")
    assert a.job == spot.name
    agent.start(spot.name, 1)
    sha = "ab" * 32
    agent.report(agent.event(spot.name, 1, checkpoint=ws.Checkpointed(sha256=sha, size_bytes=10)))
    clock.advance(0.3)
    gold = jobs.CreateJob(js.CreateJobRequest(spec=job_pb2.JobSpec(command=["g"], gpu_count=1)))
    cancel = agent.next_of("cancellation")
    assert (cancel.job, cancel.attempt) == (spot.name, 1)
    assign = agent.next_of("assignment")
    assert assign.job == gold.name
    s = wait(jobs, spot.name, lambda j: j.state == State.PENDING)
    assert s.attempts[0].state == job_pb2.Attempt.PREEMPTED
    # spot pays 60% of $1.00/h: 600000 micros per GPU-hour
    assert s.attempts[0].price_micros_per_gpu_hour == 600_000
    expected = charge_micros(s.attempts[0].gpu_milliseconds, 600_000)  # half up
    assert s.attempts[0].charge_micros == expected
    kinds = [job_pb2.SlaEvent.Kind.Name(e.kind) for e in s.sla_events]
    assert kinds == ["INTERRUPTION", "LOST_WORK"]
    assert s.credit_micros == 0  # spot: no credit
    assert s.checkpoint_sha256 == sha
    # The guaranteed job finishes; the spot job comes back as attempt 2 with its checkpoint.
    agent.finish(cancel.job, 1, exit_code=-15)  # the agent confirms the preempted process ended
    agent.start(gold.name, 1)
    agent.finish(gold.name, 1)
    again = agent.next_of("assignment")
    assert (again.job, again.attempt, again.checkpoint_sha256) == (spot.name, 2, sha)
    agent.close()


def test_guaranteed_job_that_loses_its_rig_is_credited_the_lost_work(rb, stubs, clock):
    jobs, farms = stubs
    farm = make_farm(farms)
    agent = ProtocolAgent(rb.address, farm.enrollment_token, gpus(1, price=3_600_000))
    agent.register()
    agent.connect()
    job = jobs.CreateJob(js.CreateJobRequest(spec=job_pb2.JobSpec(command=["g"], gpu_count=1)))
    agent.next_of("assignment")
    agent.start(job.name, 1)
    clock.advance(0.6)
    agent.heartbeat()  # the last sign of life: work up to here is billable and lost
    clock.advance(3.5)  # past the lease TTL (3 s): the broker's next tick expires the lease
    lost = wait(jobs, job.name, lambda j: j.state == State.PENDING, timeout=8)
    kinds = [job_pb2.SlaEvent.Kind.Name(e.kind) for e in lost.sla_events]
    assert kinds == ["HEARTBEAT_GAP", "INTERRUPTION", "LOST_WORK"]
    lost_work = lost.sla_events[-1]
    # 0.6 s billed up to the last heartbeat ($3.60/h: 600 micros), all of it lost and credited
    assert (lost.attempts[0].gpu_milliseconds, lost.attempts[0].charge_micros) == (600, 600)
    assert (lost_work.seconds, lost_work.credit_micros) == (0, 600)
    assert lost.credit_micros == lost_work.credit_micros
    assert lost.attempts[0].state == job_pb2.Attempt.LOST
    store = Store(rb.broker.store.url)
    problems, _ = verify_ledger(store)
    store.close()
    assert problems == []
    agent.close()


def test_quote_says_what_matches_and_the_price_range(rb, stubs):
    jobs, farms = stubs
    farm = make_farm(farms)
    agent = ProtocolAgent(rb.address, farm.enrollment_token, gpus(4, price=500_000))
    agent.register()
    q = jobs.QuoteJob(js.QuoteJobRequest(spec=job_pb2.JobSpec(command=["x"], gpu_count=2)))
    assert (q.matching_gpus, q.free_matching_gpus, q.placeable_now) == (4, 4, True)
    assert q.min_price_micros_per_gpu_hour == q.max_price_micros_per_gpu_hour == 500_000
    spot = jobs.QuoteJob(
        js.QuoteJobRequest(spec=job_pb2.JobSpec(command=["x"], gpu_count=1, tier=job_pb2.SPOT))
    )
    assert spot.min_price_micros_per_gpu_hour == 300_000
    too_big = jobs.QuoteJob(js.QuoteJobRequest(spec=job_pb2.JobSpec(command=["x"], gpu_count=8)))
    assert not too_big.placeable_now
    assert too_big.reasons[0].resource == "gpu_count"
    assert list(jobs.ListJobs(js.ListJobsRequest()).jobs) == []  # a quote creates nothing
    agent.close()


def test_farm_terms_and_ledger_survive_a_restart(tmp_path: Path):
    clock = ManualClock()
    b = start_broker(tmp_path / "b", clock)
    with authed_channel(b.address) as ch:
        farms = fsg.FarmServiceStub(ch)
        farm = make_farm(farms, tariff_micros_per_kwh=123_000, broker_fee_permille=50)
        agent = ProtocolAgent(b.address, farm.enrollment_token, gpus(1, price=3_600_000))
        agent.register()
        agent.connect()
        jobs = jsg.JobServiceStub(ch)
        job = jobs.CreateJob(js.CreateJobRequest(spec=job_pb2.JobSpec(command=["x"], gpu_count=1)))
        agent.next_of("assignment")
        agent.start(job.name, 1)
        clock.advance(1.0)  # a nonzero charge: the ledger gets a transaction
        agent.finish(job.name, 1)
        wait(jobs, job.name, lambda j: j.state == State.SUCCEEDED)
        agent.close()
    b.stop()
    b2 = start_broker(tmp_path / "b")
    try:
        with authed_channel(b2.address) as ch:
            farms = fsg.FarmServiceStub(ch)
            got = farms.GetFarm(farm_service_pb2.GetFarmRequest(name=farm.name))
            assert (got.tariff_micros_per_kwh, got.broker_fee_permille) == (123_000, 50)
            (row,) = farms.GetEarnings(farm_service_pb2.GetEarningsRequest()).rows
            assert row.revenue_micros > 0  # the payout, read from the store's ledger
        # The ledger survives in the store; the broker's core holds none (docs/scale.md).
        assert b2.broker.service.core.ledger == []
        problems, summary = verify_ledger(b2.broker.store)
        assert (problems, summary["entries"]) == ([], 3)
    finally:
        b2.stop()


def test_verify_ledger_command_passes_then_catches_a_tampered_entry(tmp_path: Path):
    from click.testing import CliRunner
    from sqlmodel import Session

    from broker.cli import admin_group
    from broker.store import LedgerRow

    home = tmp_path / "b"
    clock = ManualClock()
    b = start_broker(home, clock)
    with authed_channel(b.address) as ch:
        farm = make_farm(fsg.FarmServiceStub(ch))
        agent = ProtocolAgent(b.address, farm.enrollment_token, gpus(1, price=3_600_000))
        agent.register()
        agent.connect()
        jobs = jsg.JobServiceStub(ch)
        job = jobs.CreateJob(js.CreateJobRequest(spec=job_pb2.JobSpec(command=["x"], gpu_count=1)))
        agent.next_of("assignment")
        agent.start(job.name, 1)
        clock.advance(0.2)  # a nonzero charge: the ledger gets a transaction
        agent.finish(job.name, 1)
        wait(jobs, job.name, lambda j: j.state == State.SUCCEEDED)
        agent.close()
    b.stop()
    runner = CliRunner()
    ok = runner.invoke(admin_group, ["verify-ledger", "--home", str(home)])
    assert ok.exit_code == 0, ok.output
    assert "ledger OK: 3 entries in 1 transactions balance to 0" in ok.output
    store = Store(f"sqlite:///{home / 'broker.db'}")
    with Session(store.engine) as s:
        s.add(
            LedgerRow(
                txn="oops",
                account="farm:x",
                amount_micros=5,
                kind="payout",
                job_id="j",
                attempt=1,
                time=0,
            )
        )
        s.commit()
    store.close()
    bad = runner.invoke(admin_group, ["verify-ledger", "--home", str(home)])
    assert bad.exit_code == 1
    assert "ledger does not balance: entries sum to 5 micro-dollars" in bad.output
