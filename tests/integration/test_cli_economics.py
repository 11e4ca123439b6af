"""The ``rigshift`` CLI's economics against a real broker: farm prices, tiers, quotes, earnings.

Like test_cli.py, each test drives the CLI through click's CliRunner with
``--broker`` pointing at the ``broker_address`` fixture. Where GPUs are needed,
a :class:`ProtocolAgent` registers them over the real WorkerService protocol
and the test decides when attempts start and finish.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_harness import ManualClock
from click.testing import CliRunner, Result
from protocol_agent import ProtocolAgent, create_farm, gpus

from rigshift_cli import main

pytestmark = pytest.mark.timeout(60)


def rs(address: str, group: str, *args: str) -> Result:
    """Run ``rigshift GROUP --broker ADDRESS ARGS...`` and return the result."""
    return CliRunner().invoke(main, [group, "--broker", address, *args])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def as_json(result: Result) -> dict[str, Any]:
    return json.loads(ok(result).stdout)


def failed(result: Result, code: int = 1) -> Result:
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    return result


def micros(value: Any) -> int:
    """An int64 from proto JSON (a string), or 0 when the field was omitted."""
    return int(value or 0)


ECONOMICS = [
    "--region",
    "eu-north",
    "--tariff-usd-per-kwh",
    "0.12",
    "--pue",
    "1.25",
    "--mining",
    "RTX 3090=0.08",
    "--mining",
    "A4000=0.05",
    "--broker-fee-percent",
    "10",
    "--margin-usd-per-gpu-hour",
    "0.02",
]


def create(address: str, name: str, *args: str) -> dict[str, Any]:
    return as_json(rs(address, "farm", "create", name, *args, "--json"))


@pytest.fixture
def agents() -> Iterator[list[ProtocolAgent]]:
    """ProtocolAgents a test registers; closed at the end."""
    started: list[ProtocolAgent] = []
    yield started
    for agent in started:
        agent.close()


def register(
    agents: list[ProtocolAgent], address: str, token: str, n: int = 2, **gpu_kwargs: Any
) -> ProtocolAgent:
    agent = ProtocolAgent(address, token, gpus(n, **gpu_kwargs), hostname=f"rig-{len(agents)}")
    agents.append(agent)
    agent.register()
    agent.connect()
    agent.heartbeat()
    return agent


def floor_parts(watts: int, tariff: int, pue: int, mining_per_kwh: int, margin: int) -> tuple:
    """(energy cost, mining, floor) per GPU-hour in micro-dollars, as exact fractions."""
    energy = watts * tariff * pue / 1_000_000  # W→kW and permille→ratio
    mining = watts * mining_per_kwh / 1000
    return energy, mining, max(energy, mining) + margin


# -- farm economics ----------------------------------------------------------------


def test_farm_create_with_economics_then_get_shows_them_and_the_floors(
    broker_address: str, agents: list[ProtocolAgent]
) -> None:
    farm = create(broker_address, "econ-1", *ECONOMICS)
    assert farm["enrollment_token"]
    assert micros(farm["tariff_micros_per_kwh"]) == 120_000
    assert farm["pue_permille"] == 1250
    assert {k: micros(v) for k, v in farm["mining_micros_per_kwh"].items()} == {
        "RTX 3090": 80_000,
        "A4000": 50_000,
    }
    assert farm["broker_fee_permille"] == 100
    assert micros(farm["margin_micros_per_gpu_hour"]) == 20_000

    register(agents, broker_address, farm["enrollment_token"], n=2)  # RTX 3090, 350 W
    got = as_json(rs(broker_address, "farm", "get", farm["name"], "--json"))
    assert "enrollment_token" not in got
    assert got["region"] == "eu-north"
    assert micros(got["tariff_micros_per_kwh"]) == 120_000
    assert got["pue_permille"] == 1250
    assert micros(got["mining_micros_per_kwh"]["RTX 3090"]) == 80_000
    assert got["broker_fee_permille"] == 100
    assert micros(got["margin_micros_per_gpu_hour"]) == 20_000

    floors = {f["gpu_model"]: f for f in got["floors"]}
    assert set(floors) == {"RTX 3090", "A4000"}  # registered, or named in the farm's tables
    floor = floors["RTX 3090"]
    watts = floor["watts"]
    assert watts == 350  # the GPUs' power limit
    energy, mining, total = floor_parts(watts, 120_000, 1250, 80_000, 20_000)
    assert abs(micros(floor["energy_cost_micros_per_gpu_hour"]) - energy) <= 1
    assert abs(micros(floor["mining_micros_per_gpu_hour"]) - mining) <= 1
    assert abs(micros(floor["floor_micros_per_gpu_hour"]) - total) <= 1

    human = ok(rs(broker_address, "farm", "get", farm["name"].split("/")[1])).stdout
    assert "$0.120000/kWh" in human and "1.250" in human
    assert "RTX 3090 $0.080000/kWh" in human and "10.0%" in human
    assert "floor prices" in human
    row = next(line for line in human.splitlines() if line.strip().startswith("RTX 3090"))
    assert "350 W" in row and f"${micros(floor['floor_micros_per_gpu_hour']) / 1e6:.6f}" in row


def test_farm_create_with_time_of_use_table(broker_address: str, tmp_path: Path) -> None:
    table = tmp_path / "tou.txt"
    table.write_text("# evening peak\n17-21 0.31\n22-6 0.08  # night\n")
    farm = create(
        broker_address, "econ-tou", "--tariff-usd-per-kwh", "0.12", "--tariff-file", str(table)
    )
    got = as_json(rs(broker_address, "farm", "get", farm["name"], "--json"))
    windows = [
        (w.get("start_hour", 0), w["end_hour"], micros(w["micros_per_kwh"]))
        for w in got["tariff_windows"]
    ]
    assert windows == [(17, 21, 310_000), (22, 6, 80_000)]
    human = ok(rs(broker_address, "farm", "get", farm["name"])).stdout
    assert "17-21 UTC $0.310000/kWh" in human and "22-06 UTC $0.080000/kWh" in human


def test_farm_update_changes_only_the_fields_given(
    broker_address: str, agents: list[ProtocolAgent], tmp_path: Path
) -> None:
    farm = create(broker_address, "econ-2", *ECONOMICS, "--ask", "RTX 3090=0.50")
    register(agents, broker_address, farm["enrollment_token"])
    before = as_json(rs(broker_address, "farm", "get", farm["name"], "--json"))

    updated = as_json(rs(broker_address, "farm", "update", farm["name"], "--pue", "1.5", "--json"))
    assert updated["pue_permille"] == 1500
    after = as_json(rs(broker_address, "farm", "get", farm["name"], "--json"))
    assert after["pue_permille"] == 1500
    unchanged = {k: v for k, v in before.items() if k not in ("pue_permille", "floors")}
    assert {k: after.get(k) for k in unchanged} == unchanged
    # the energy part of the floor follows the new PUE
    floor = {f["gpu_model"]: f for f in after["floors"]}["RTX 3090"]
    energy, _, _ = floor_parts(floor["watts"], 120_000, 1500, 80_000, 20_000)
    assert abs(micros(floor["energy_cost_micros_per_gpu_hour"]) - energy) <= 1

    # --ask and --mining set one model's entry and keep the others
    ok(rs(broker_address, "farm", "update", farm["name"], "--mining", "RTX 3090=0.09"))
    got = as_json(rs(broker_address, "farm", "get", farm["name"], "--json"))
    assert {k: micros(v) for k, v in got["mining_micros_per_kwh"].items()} == {
        "RTX 3090": 90_000,
        "A4000": 50_000,
    }
    assert micros(got["ask_micros_per_gpu_hour"]["RTX 3090"]) == 500_000
    assert micros(got["tariff_micros_per_kwh"]) == 120_000

    table = tmp_path / "tou.txt"
    table.write_text("17-21 0.31\n")
    human = ok(
        rs(
            broker_address,
            "farm",
            "update",
            farm["name"].split("/")[1],
            "--tariff-file",
            str(table),
            "--broker-fee-percent",
            "12.5",
            "--remove-mining",
            "A4000",
        )
    ).stdout
    assert human.startswith(f"updated {farm['name']}: ")
    assert "17-21 UTC $0.310000/kWh" in human and "12.5%" in human
    got = as_json(rs(broker_address, "farm", "get", farm["name"], "--json"))
    assert got["broker_fee_permille"] == 125
    assert list(got["mining_micros_per_kwh"]) == ["RTX 3090"]
    assert len(got["tariff_windows"]) == 1
    assert got["pue_permille"] == 1500 and got["region"] == "eu-north"

    ok(rs(broker_address, "farm", "update", farm["name"], "--clear-tariff-windows"))
    got = as_json(rs(broker_address, "farm", "get", farm["name"], "--json"))
    assert "tariff_windows" not in got
    assert got["broker_fee_permille"] == 125


def test_ask_under_the_floor_is_refused_with_the_reason(
    broker_address: str, agents: list[ProtocolAgent]
) -> None:
    farm = create(broker_address, "econ-3", *ECONOMICS)
    register(agents, broker_address, farm["enrollment_token"])  # RTX 3090 floor ≈ $0.0725
    result = failed(rs(broker_address, "farm", "update", farm["name"], "--ask", "RTX 3090=0.01"))
    assert result.stderr.startswith("error: ")
    assert "floor" in result.stderr.lower()
    assert "RTX 3090" in result.stderr
    assert result.stdout == ""
    got = as_json(rs(broker_address, "farm", "get", farm["name"], "--json"))
    assert "ask_micros_per_gpu_hour" not in got  # nothing changed

    ok(rs(broker_address, "farm", "update", farm["name"], "--ask", "RTX 3090=0.40"))
    got = as_json(rs(broker_address, "farm", "get", farm["name"], "--json"))
    assert micros(got["ask_micros_per_gpu_hour"]["RTX 3090"]) == 400_000


def test_ask_under_the_floor_is_refused_at_creation(broker_address: str) -> None:
    result = failed(
        rs(broker_address, "farm", "create", "econ-4", *ECONOMICS, "--ask", "RTX 3090=0.01")
    )
    assert result.stderr.startswith("error: ")
    assert "floor" in result.stderr.lower() and "RTX 3090" in result.stderr


def test_farm_update_unknown_farm(broker_address: str) -> None:
    result = failed(rs(broker_address, "farm", "update", "no-such-farm", "--pue", "1.1"))
    assert result.stderr.startswith("error: NOT_FOUND")


# -- tiers and quotes ------------------------------------------------------------------


def test_submit_spot_then_get_shows_the_tier(broker_address: str) -> None:
    job = as_json(rs(broker_address, "job", "submit", "--tier", "spot", "--json", "--", "true"))
    got = as_json(rs(broker_address, "job", "get", job["name"], "--json"))
    assert got["spec"]["tier"] == "SPOT"
    human = ok(rs(broker_address, "job", "get", job["name"])).stdout
    assert "SPOT" in human and "cost so far:" in human and "credits:" in human

    default = as_json(rs(broker_address, "job", "submit", "--json", "--", "true"))
    got = as_json(rs(broker_address, "job", "get", default["name"], "--json"))
    assert got["spec"].get("tier", "GUARANTEED") == "GUARANTEED"


def test_quote_with_a_registered_agent(broker_address: str, agents: list[ProtocolAgent]) -> None:
    farm = create_farm(broker_address, "quote-farm")
    register(agents, broker_address, farm.enrollment_token, n=2, price=300_000)

    quote = as_json(
        rs(broker_address, "job", "quote", "--gpu-model", "RTX 3090", "--json", "--", "python")
    )
    assert quote["matching_gpus"] == 2
    assert quote["free_matching_gpus"] == 2
    assert micros(quote["min_price_micros_per_gpu_hour"]) == 300_000
    assert micros(quote["max_price_micros_per_gpu_hour"]) == 300_000
    assert quote["placeable_now"] is True

    human = ok(rs(broker_address, "job", "quote", "--gpus", "2")).stdout  # COMMAND optional
    assert human.startswith("2 matching GPUs (2 free now), $0.300000\N{EN DASH}$0.300000/GPU-h")
    assert human.splitlines()[0].endswith("placeable now: yes")
    # the matching group with its score, verification and link (healthy figures, x16 estimate)
    assert human.splitlines()[-1].split()[-6:] == ["2/2", "100", "verified", "12.8", "-", "-"]

    spot = as_json(rs(broker_address, "job", "quote", "--tier", "spot", "--json"))
    assert spot["matching_gpus"] == 2
    assert micros(spot["max_price_micros_per_gpu_hour"]) <= 300_000  # spot is never dearer

    none = as_json(rs(broker_address, "job", "quote", "--gpu-model", "H100", "--json"))
    assert none.get("matching_gpus", 0) == 0
    assert not none.get("placeable_now", False)
    assert none["reasons"]
    human = ok(rs(broker_address, "job", "quote", "--gpu-model", "H100")).stdout
    assert "placeable now: no" in human and "\n  - " in human

    busy = ok(rs(broker_address, "job", "quote", "--gpus", "3")).stdout
    assert "placeable now: no" in busy


def test_quote_validates_like_submit(broker_address: str) -> None:
    result = failed(rs(broker_address, "job", "quote", "--gpus", "0"))
    assert result.stderr.startswith("error: INVALID_ARGUMENT")


# -- earnings ------------------------------------------------------------------------


def test_earnings_after_a_job_ran(
    broker_address: str, broker_clock: ManualClock, agents: list[ProtocolAgent]
) -> None:
    farm = create(broker_address, "earn-1", *ECONOMICS)
    agent = register(agents, broker_address, farm["enrollment_token"], n=1, price=3_600_000)
    empty = ok(rs(broker_address, "farm", "earnings", "--farm", farm["name"])).stdout
    assert empty.startswith("no earnings yet") or empty.splitlines()[1].startswith("earn-1 ")

    job = as_json(rs(broker_address, "job", "submit", "--json", "--", "python", "train.py"))
    a = agent.next_of("assignment")
    assert a.job == job["name"]
    agent.start(a.job, a.attempt)
    broker_clock.advance(1.0)  # at $3.60/GPU-h a second earns 1000 micro-dollars
    agent.finish(a.job, a.attempt, exit_code=0, energy=360_000)  # 0.1 kWh

    deadline = time.monotonic() + 10
    while True:
        got = as_json(rs(broker_address, "job", "get", job["name"], "--json"))
        if got["state"] == "SUCCEEDED" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert got["state"] == "SUCCEEDED"
    assert micros(got.get("cost_micros")) == 1000
    assert micros(got["attempts"][0].get("charge_micros")) == micros(got["cost_micros"])
    human = ok(rs(broker_address, "job", "get", job["name"])).stdout
    assert f"${micros(got['cost_micros']) / 1e6:.6f}" in human

    earnings = as_json(rs(broker_address, "farm", "earnings", "--farm", farm["name"], "--json"))
    (row,) = earnings["rows"]
    assert row["key"] == farm["name"] and row["farm"] == farm["name"]
    assert row["farm_display_name"] == "earn-1"
    assert micros(row["revenue_micros"]) > 0
    assert micros(row["revenue_micros"]) < micros(got["cost_micros"])  # less the 10% fee
    assert micros(row["energy_joules"]) == 360_000
    assert micros(row["gpu_milliseconds"]) == 1000
    assert micros(row["margin_micros"]) == micros(row["revenue_micros"]) - micros(
        row["energy_cost_micros"]
    )
    assert "mining_usd_per_kwh" in row
    assert row["mining_usd_per_kwh"] == pytest.approx(0.08)
    assert row["revenue_usd_per_kwh"] == pytest.approx(micros(row["revenue_micros"]) / 1e6 / 0.1)
    assert row["attempts"] == 1

    for by in ("worker", "gpu"):
        grouped = as_json(
            rs(broker_address, "farm", "earnings", "--farm", farm["name"], "--by", by, "--json")
        )
        (row_by,) = grouped["rows"]
        assert row_by["key"].startswith(agent.worker)
        assert row_by["revenue_micros"] == row["revenue_micros"]

    table = ok(rs(broker_address, "farm", "earnings", "--since", "1h")).stdout
    line = next(x for x in table.splitlines() if x.startswith("earn-1 "))  # the display name
    assert "$0.0800" in line
    later = as_json(
        rs(broker_address, "farm", "earnings", "--farm", farm["name"], "--since", "0s", "--json")
    )
    for row in later.get("rows", []):  # the farm may still get a row, with nothing sold
        assert (row["attempts"], micros(row["revenue_micros"])) == (0, 0)


def test_workers_show_reliability(broker_address: str, agents: list[ProtocolAgent]) -> None:
    farm = create_farm(broker_address, "rel-farm")
    register(agents, broker_address, farm.enrollment_token)
    table = ok(rs(broker_address, "farm", "workers", "--farm", farm.name)).stdout
    assert "RELIABILITY" in table.splitlines()[0]
    workers = as_json(rs(broker_address, "farm", "workers", "--farm", farm.name, "--json"))
    permille = workers["workers"][0].get("reliability_permille", 0)
    assert 0 < permille <= 1000
    assert f"{permille // 10}.{permille % 10}%" in table


def test_earnings_and_verify_ledger_read_the_database_when_no_broker_runs(
    running_broker, agents: list[ProtocolAgent], tmp_path: Path, monkeypatch
) -> None:
    """After `make demo` the broker is gone: the commands read the demo's database."""
    address = running_broker.address
    farm = create(address, "earn-offline", *ECONOMICS)
    agent = register(agents, address, farm["enrollment_token"], n=1, price=3_600_000)
    job = as_json(rs(address, "job", "submit", "--json", "--", "python", "train.py"))
    a = agent.next_of("assignment")
    agent.start(a.job, a.attempt)
    agent.finish(a.job, a.attempt, exit_code=0, energy=180_000)
    deadline = time.monotonic() + 10
    while as_json(rs(address, "job", "get", job["name"], "--json"))["state"] != "SUCCEEDED":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    live = as_json(rs(address, "farm", "earnings", "--json"))
    assert any(micros(r.get("revenue_micros")) > 0 for r in live["rows"])
    db_url = running_broker.broker.config.resolved_db_url()
    assert as_json(rs(address, "farm", "earnings", "--db", db_url, "--json")) == live
    running_broker.stop()

    cwd = tmp_path / "cwd"
    (cwd / ".rigshift" / "demo" / "broker").mkdir(parents=True)
    import shutil

    shutil.copy(
        db_url.removeprefix("sqlite:///"), cwd / ".rigshift" / "demo" / "broker" / "broker.db"
    )
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("RIGSHIFT_BROKER", raising=False)
    offline = CliRunner().invoke(main, ["farm", "earnings", "--json"])
    assert json.loads(ok(offline).stdout) == live
    assert "reading the local database .rigshift/demo/broker/broker.db" in offline.stderr
    ledger = ok(CliRunner().invoke(main, ["admin", "verify-ledger"]))
    assert ledger.stdout.startswith("ledger OK") and "last demo's database" in ledger.stderr
    # An explicit --broker means that broker: no silent fallback to a file.
    failed(CliRunner().invoke(main, ["farm", "earnings", "--broker", "127.0.0.1:1"]))
