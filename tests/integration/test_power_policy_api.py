"""Power caps over the real API (issue 16): the farm's policy (UpdateFarm / GetFarm and
its validation), the AI limit and the score at it in ListWorkers, the limit in the
Assignment, energy saved in GetEarnings, and all of it after a broker restart.

The agent's curve is the simulated RTX 3090 (``tests/unit/test_power.py``): at 5 %
slowdown the broker caps it at 280 W (963/1000 of the throughput, 823/1000 of the draw).
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from broker_harness import ManualClock, start_broker
from google.protobuf import field_mask_pb2
from protocol_agent import ProtocolAgent, authed_channel, gpus

from rigshift.v1 import farm_pb2, farm_service_pb2, job_pb2
from rigshift.v1 import farm_service_pb2_grpc as fsg
from rigshift.v1 import job_service_pb2 as js
from rigshift.v1 import job_service_pb2_grpc as jsg

CURVE = [
    farm_pb2.PowerPoint(limit_watts=w, fp16_gflops=f, draw_watts=d)
    for w, f, d in (
        (175, 38_517, 175),
        (210, 42_543, 210),
        (245, 45_674, 245),
        (280, 47_910, 280),
        (315, 49_252, 315),
        (350, 49_700, 340),
    )
]
EFFICIENT = farm_pb2.POWER_POLICY_EFFICIENT


def capped_gpus(n: int, settable: bool = True):
    infos = gpus(n)
    for g in infos:
        g.power_curve.extend(CURVE)
        g.power_limit_settable = settable
    return infos


def update(farms, name: str, **fields) -> farm_pb2.Farm:
    return farms.UpdateFarm(
        farm_service_pb2.UpdateFarmRequest(
            farm=farm_pb2.Farm(name=name, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
        )
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def test_policy_validation_is_field_level(tmp_path: Path, clock):
    rb = start_broker(tmp_path / "b", clock)
    try:
        with authed_channel(rb.address) as ch:
            farms = fsg.FarmServiceStub(ch)
            farm = farms.CreateFarm(
                farm_service_pb2.CreateFarmRequest(farm=farm_pb2.Farm(display_name="f"))
            )
            assert farm.power_policy == farm_pb2.POWER_POLICY_MAX
            for fields, field in (
                ({"max_slowdown_percent": 51}, "farm.max_slowdown_percent"),
                ({"max_slowdown_percent": -1}, "farm.max_slowdown_percent"),
                ({"power_policy": 7}, "farm.power_policy"),
                ({"demand_response_micros_per_mwh": -5}, "farm.demand_response_micros_per_mwh"),
            ):
                with pytest.raises(grpc.RpcError) as exc:
                    update(farms, farm.name, **fields)
                assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert field in exc.value.details()
            got = update(
                farms, farm.name, power_policy=EFFICIENT, max_slowdown_percent=50,
                demand_response_micros_per_mwh=120_000_000,
            )  # fmt: skip
            assert (got.power_policy, got.max_slowdown_percent) == (EFFICIENT, 50)
            assert got.demand_response_micros_per_mwh == 120_000_000
    finally:
        rb.stop()


def wait_state(jobs, name: str, state, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while (job := jobs.GetJob(js.GetJobRequest(name=name))).state != state:
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    return job


def test_ai_limit_in_workers_assignment_and_earnings_and_after_a_restart(tmp_path: Path, clock):
    home = tmp_path / "b"
    rb = start_broker(home, clock)
    with authed_channel(rb.address) as ch:
        farms, jobs = fsg.FarmServiceStub(ch), jsg.JobServiceStub(ch)
        farm = farms.CreateFarm(
            farm_service_pb2.CreateFarmRequest(
                farm=farm_pb2.Farm(display_name="f", tariff_micros_per_kwh=100_000)
            )
        )
        agent = ProtocolAgent(rb.address, farm.enrollment_token, capped_gpus(2))
        agent.register()
        agent.connect()
        (worker,) = farms.ListWorkers(farm_service_pb2.ListWorkersRequest()).workers
        assert [(g.ai_power_limit_watts, g.score) for g in worker.gpus] == [(0, 100)] * 2
        assert [p.limit_watts for p in worker.gpus[0].power_curve] == [
            175, 210, 245, 280, 315, 350,
        ]  # fmt: skip
        update(farms, farm.name, power_policy=EFFICIENT, max_slowdown_percent=5)
        (worker,) = farms.ListWorkers(farm_service_pb2.ListWorkersRequest()).workers
        # 100 x 963 // 1000 = 96: the score at the limit it will run at
        assert [(g.ai_power_limit_watts, g.score) for g in worker.gpus] == [(280, 96)] * 2
        job = jobs.CreateJob(js.CreateJobRequest(spec=job_pb2.JobSpec(command=["t"], gpu_count=2)))
        a = agent.next_of("assignment")
        assert (a.job, a.power_limit_watts) == (job.name, 280)
        agent.start(a.job, a.attempt)
        clock.advance(3600.0)
        agent.finish(a.job, a.attempt, energy=1_646_000)  # 823,000 J per GPU
        wait_state(jobs, job.name, job_pb2.Job.State.SUCCEEDED)
        (row,) = farms.GetEarnings(farm_service_pb2.GetEarningsRequest(parent=farm.name)).rows
        # per GPU (823,000 x 177 + 411) // 823 = 177,000 J saved, 4,917 micro-dollars
        assert (row.energy_saved_joules, row.energy_cost_saved_micros) == (354_000, 9_834)
        agent.close()
    rb.stop()

    rb2 = start_broker(home, clock)
    try:
        with authed_channel(rb2.address) as ch:
            farms = fsg.FarmServiceStub(ch)
            got = farms.GetFarm(farm_service_pb2.GetFarmRequest(name=farm.name))
            assert (got.power_policy, got.max_slowdown_percent) == (EFFICIENT, 5)
            (worker,) = farms.ListWorkers(farm_service_pb2.ListWorkersRequest()).workers
            assert [(g.ai_power_limit_watts, g.score) for g in worker.gpus] == [(280, 96)] * 2
            assert len(worker.gpus[0].power_curve) == 6
            (row,) = farms.GetEarnings(farm_service_pb2.GetEarningsRequest(parent=farm.name)).rows
            assert row.energy_saved_joules == 354_000  # the attempt's limit was stored
    finally:
        rb2.stop()


def test_an_agent_that_may_not_set_limits_runs_uncapped(tmp_path: Path, clock):
    rb = start_broker(tmp_path / "b", clock)
    try:
        with authed_channel(rb.address) as ch:
            farms, jobs = fsg.FarmServiceStub(ch), jsg.JobServiceStub(ch)
            farm = farms.CreateFarm(
                farm_service_pb2.CreateFarmRequest(
                    farm=farm_pb2.Farm(
                        display_name="f", power_policy=EFFICIENT, max_slowdown_percent=10
                    )
                )
            )
            agent = ProtocolAgent(rb.address, farm.enrollment_token, capped_gpus(1, False))
            agent.register()
            agent.connect()
            (worker,) = farms.ListWorkers(farm_service_pb2.ListWorkersRequest()).workers
            assert (worker.gpus[0].ai_power_limit_watts, worker.gpus[0].score) == (0, 100)
            jobs.CreateJob(js.CreateJobRequest(spec=job_pb2.JobSpec(command=["t"], gpu_count=1)))
            assert agent.next_of("assignment").power_limit_watts == 0
            agent.close()
    finally:
        rb.stop()
