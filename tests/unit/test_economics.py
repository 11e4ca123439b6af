"""Table-driven tests of the money arithmetic (broker/economics.py); the sums are in comments."""

from __future__ import annotations

import pytest

from broker.economics import (
    FarmTerms,
    TariffWindow,
    charge_micros,
    credit_for_seconds,
    energy_cost_micros,
    floor_price,
    reliability_permille,
    settlement_entries,
    split_fee,
)

NORDIC = FarmTerms(
    "nordic",
    tariff_micros_per_kwh=100_000,
    pue_permille=1200,
    broker_fee_permille=200,
    margin_micros_per_gpu_hour=10_000,
    mining_micros_per_kwh=(("RTX 3090", 200_000),),
)


@pytest.mark.parametrize(
    ("terms", "model", "watts", "energy", "mining", "floor"),
    [
        # 0.35 kWh x 100000 x 1.2 = 42000; 0.35 x 200000 = 70000; max + 10000 = 80000
        (NORDIC, "RTX 3090", 350, 42_000, 70_000, 80_000),
        # no mining table for the 3060: 0.17 kWh x 100000 x 1.2 = 20400; + 10000
        (NORDIC, "RTX 3060", None, 20_400, 0, 30_400),
        # cheap power, expensive mining dominates: 0.35 x 20000 = 7000 vs 0.35 x 300000 = 105000
        (
            FarmTerms("f", 20_000, mining_micros_per_kwh=(("RTX 3090", 300_000),)),
            "RTX 3090",
            350,
            7_000,
            105_000,
            105_000,
        ),
        # nothing configured: the floor is zero
        (FarmTerms("f"), "RTX 3090", 350, 0, 0, 0),
    ],
)
def test_floor_price(terms, model, watts, energy, mining, floor):
    f = floor_price(terms, model, watts)
    assert (f.energy_cost_micros, f.mining_micros, f.floor_micros) == (energy, mining, floor)


@pytest.mark.parametrize(
    ("gpu_ms", "price", "charge"),
    [
        (3_600_000, 350_000, 350_000),  # one GPU-hour at $0.35
        (1, 350_000, 0),  # 1 ms x 350000 / 3.6e6 = 0.097 -> 0
        (6, 300_000, 1),  # 6 x 300000 / 3.6e6 = 0.5 -> rounds half up to 1
        (2_600, 600_000, 433),  # 433.33 -> 433
        (0, 999_999, 0),
    ],
)
def test_charge_rounds_half_up(gpu_ms, price, charge):
    assert charge_micros(gpu_ms, price) == charge


@pytest.mark.parametrize(
    ("charge", "fee_permille", "payout", "fee"),
    [
        (350_000, 200, 280_000, 70_000),
        (433, 150, 369, 64),  # 433 x 0.15 = 64.95 -> fee rounds down, payout takes the rest
        (1, 999, 1, 0),
        (1000, 1000, 0, 1000),
    ],
)
def test_fee_split_adds_up_exactly(charge, fee_permille, payout, fee):
    assert split_fee(charge, fee_permille) == (payout, fee)
    assert payout + fee == charge


def test_settlement_is_three_legs_summing_to_zero():
    legs = settlement_entries(
        owner="alice",
        farm_id="nordic",
        job_id="j",
        attempt=1,
        charge=350_000,
        fee_permille=200,
        now=0.0,
    )
    assert [(e.account, e.amount_micros, e.kind) for e in legs] == [
        ("client:alice", -350_000, "charge"),
        ("farm:nordic", 280_000, "payout"),
        ("broker:fees", 70_000, "fee"),
    ]
    assert {e.txn for e in legs} == {"settle:j:1"}


def test_worked_example_of_docs_economics():
    # 2 GPUs x 30 min at $0.35 = $0.35; 0.70 kWh drawn -> energy cost 0.7 x 0.10 x 1.2 = $0.084
    charge = charge_micros(2 * 1_800_000, 350_000)
    payout, fee = split_fee(charge, NORDIC.broker_fee_permille)
    cost = energy_cost_micros(NORDIC, 2_520_000, 0.0, 1800.0)
    assert (charge, payout, fee, cost, payout - cost) == (350_000, 280_000, 70_000, 84_000, 196_000)
    assert payout / 0.70 == pytest.approx(400_000)  # $0.40 per kWh vs $0.20 mining


def test_time_of_use_tariff_splits_energy_at_hour_boundaries():
    # Peak 17-21 UTC at $0.30, otherwise $0.10, PUE 1.0. 2 kWh evenly over 16:30-17:30:
    # 1 kWh at $0.10 + 1 kWh at $0.30 = $0.40
    terms = FarmTerms(
        "f", tariff_micros_per_kwh=100_000, tariff_windows=(TariffWindow(17, 21, 300_000),)
    )
    start = 16.5 * 3600
    assert energy_cost_micros(terms, 7_200_000, start, start + 3600) == 400_000
    # A window that wraps midnight: 22-6.
    night = FarmTerms("f", 100_000, tariff_windows=(TariffWindow(22, 6, 50_000),))
    assert energy_cost_micros(night, 3_600_000, 23 * 3600, 23 * 3600 + 60) == 50_000
    assert energy_cost_micros(night, 3_600_000, 12 * 3600, 12 * 3600 + 60) == 100_000


@pytest.mark.parametrize(
    ("seconds", "gpus", "price", "credit"),
    [
        (60, 1, 3_600_000, 60_000),  # a minute of a $3.60/h GPU = $0.06
        (30, 4, 360_000, 12_000),  # 120 GPU-s at $0.0001/s
        (7200, 1, 3_600_000, 3_600_000),  # capped at one hour
        (-5, 1, 3_600_000, 0),
    ],
)
def test_credit_schedule(seconds, gpus, price, credit):
    assert credit_for_seconds(seconds, gpus, price) == credit


@pytest.mark.parametrize(
    ("window", "offline", "ok", "lost", "score"),
    [
        (86400, 0, 0, 0, 1000),  # new and perfect
        (86400, 3600, 8, 1, 862),  # (23/24) x (9/10) = 0.8625 -> 862 (round half to even)
        (86400, 0, 0, 1, 500),  # (0+1)/(0+1+1)
        (86400, 86400, 5, 0, 0),  # offline all window
        (0, 0, 0, 0, 1000),
    ],
)
def test_reliability(window, offline, ok, lost, score):
    assert reliability_permille(window, offline, ok, lost) == score
