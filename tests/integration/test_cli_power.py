"""``rigshift farm update --power-policy`` and what the farm's commands show of power caps
(issue 16), against a real broker. The agent's curve is the simulated RTX 3090 of
``tests/unit/test_power.py``: at 5 % slowdown the broker caps it at 280 W."""

from __future__ import annotations

import time
from typing import Any

import pytest
from broker_harness import ManualClock
from protocol_agent import ProtocolAgent
from test_cli_economics import as_json, create, failed, micros, ok, rs
from test_power_policy_api import capped_gpus

pytestmark = pytest.mark.timeout(60)


def test_power_policy_from_the_cli(broker_address: str) -> None:
    farm = create(broker_address, "power-1")
    got = as_json(
        rs(
            broker_address, "farm", "update", farm["name"], "--power-policy", "efficient",
            "--max-slowdown-percent", "10", "--demand-response-usd-per-mwh", "40", "--json",
        )
    )  # fmt: skip
    assert got["power_policy"] == "POWER_POLICY_EFFICIENT"
    assert got["max_slowdown_percent"] == 10
    assert micros(got["demand_response_micros_per_mwh"]) == 40_000_000
    human = ok(rs(broker_address, "farm", "get", farm["name"])).stdout
    assert "efficient (at most 10% slower per GPU)" in human
    assert "$40.000000/MWh" in human
    failed(rs(broker_address, "farm", "update", farm["name"], "--max-slowdown-percent", "51"), 2)
    failed(rs(broker_address, "farm", "update", farm["name"], "--power-policy", "eco"), 2)
    back = as_json(
        rs(broker_address, "farm", "update", farm["name"], "--power-policy", "max", "--json")
    )
    assert back["power_policy"] == "POWER_POLICY_MAX"
    assert back["max_slowdown_percent"] == 10  # not in the mask: kept


def test_workers_show_the_cap_and_earnings_the_energy_saved(
    broker_address: str, broker_clock: ManualClock
) -> None:
    farm = create(broker_address, "power-2", "--tariff-usd-per-kwh", "0.10")
    ok(
        rs(
            broker_address, "farm", "update", farm["name"], "--power-policy", "efficient",
            "--max-slowdown-percent", "5",
        )
    )  # fmt: skip
    agent = ProtocolAgent(broker_address, farm["enrollment_token"], capped_gpus(1))
    agent.register()
    agent.connect()
    try:
        workers = ok(rs(broker_address, "farm", "workers", "--farm", farm["name"])).stdout
        assert "96 at 280 W" in workers
        job = as_json(rs(broker_address, "job", "submit", "--json", "--", "python", "train.py"))
        a = agent.next_of("assignment")
        assert (a.job, a.power_limit_watts) == (job["name"], 280)
        agent.start(a.job, a.attempt)
        broker_clock.advance(3600.0)
        agent.finish(a.job, a.attempt, exit_code=0, energy=823_000)
        deadline = time.monotonic() + 10
        while as_json(rs(broker_address, "job", "get", job["name"], "--json"))["state"] != (
            "SUCCEEDED"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        earnings: dict[str, Any] = as_json(
            rs(broker_address, "farm", "earnings", "--farm", farm["name"], "--json")
        )
        (row,) = earnings["rows"]
        # (823,000 x 177 + 411) // 823 = 177,000 J; 0.04917 kWh x $0.10 = 4,917 micro-dollars
        assert micros(row["energy_saved_joules"]) == 177_000
        assert micros(row["energy_cost_saved_micros"]) == 4_917
        table = ok(rs(broker_address, "farm", "earnings", "--farm", farm["name"])).stdout
        header, line = table.splitlines()[:2]
        assert "KWH SAVED" in header and "COST SAVED" in header
        assert "0.049" in line and "$0.004917" in line
    finally:
        agent.close()
