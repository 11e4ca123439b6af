"""Mining fallback: the pure policy (tables), the power model, the config. The shell with a
real miner process, alone and inside an agent that takes work from a real broker, is in
tests/integration/test_agent_mining_shell.py."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from harness.agent_fixtures import FakeClock, numeric_integral_j
from worker_agent.config import AgentConfig, ConfigError
from worker_agent.config_file import read_config_file
from worker_agent.gpu import Load, SimulatedBackend
from worker_agent.mining import (
    Arbitration,
    GpuState,
    Policy,
    Preference,
    ai_micros_per_kwh,
    decide,
    initial,
)

AI, MINING, IDLE = GpuState.AI, GpuState.MINING, GpuState.IDLE
P_AI, P_MINING = Preference.AI, Preference.MINING
POLICY = Policy(min_dwell_s=60.0, hysteresis_percent=10)


def arb(
    state: GpuState = IDLE,
    age_s: float = 1000.0,
    pref: Preference = P_AI,
    pref_age_s: float = 1000.0,
    now: float = 10_000.0,
) -> Arbitration:
    return Arbitration(state, now - age_s, pref, now - pref_age_s)


# --- the preference: threshold with hysteresis, minimum dwell --------------------------


@pytest.mark.parametrize(
    ("pref", "pref_age_s", "ai", "mining", "expected"),
    [
        # AI preferred; mining must pay more than AI x 1.10 and the preference be 60 s old.
        (P_AI, 1000, 1_000_000, 1_050_000, P_AI),  # 5 % more: inside the band
        (P_AI, 1000, 1_000_000, 1_100_000, P_AI),  # exactly 10 % more: not above it
        (P_AI, 1000, 1_000_000, 1_100_001, P_MINING),  # above the band: flips
        (P_AI, 59.9, 1_000_000, 3_000_000, P_AI),  # 3x, but the dwell is not over
        (P_AI, 60, 1_000_000, 3_000_000, P_MINING),  # dwell over (>= 60 s)
        # Mining preferred; AI must pay more than mining x 1.10.
        (P_MINING, 1000, 1_050_000, 1_000_000, P_MINING),
        (P_MINING, 1000, 1_100_001, 1_000_000, P_AI),  # AI pays more: switch back
        (P_MINING, 30, 5_000_000, 1_000_000, P_MINING),  # but not within the dwell
        (P_AI, 1000, 1_000_000, 0, P_AI),  # no mining figure: AI
    ],
)
def test_preference_table(
    pref: Preference, pref_age_s: float, ai: int, mining: int, expected: Preference
) -> None:
    out = decide(
        POLICY,
        10_000.0,
        arb(pref=pref, pref_age_s=pref_age_s),
        assigned=False,
        can_mine=True,
        ai_micros_per_kwh=ai,
        mining_micros_per_kwh=mining,
    )
    assert out.preference == expected
    flipped = expected != pref
    assert out.preference_since == (10_000.0 if flipped else 10_000.0 - pref_age_s)
    assert out.advertise == (expected == P_AI)


def test_a_price_oscillating_around_the_threshold_does_not_flap() -> None:
    """Mining revenue swings ±8 % around AI revenue every 5 s for an hour (h = 10 %):
    the preference never changes. With ±30 % swings it changes, but at most once per dwell."""
    ai = 700_000

    def run(swing_percent: int) -> list[float]:
        a = initial(0.0, ai, ai)  # equal: AI preferred
        flips = []
        for step in range(720):
            now = step * 5.0
            mining = ai * (100 + (swing_percent if step % 2 else -swing_percent)) // 100
            nxt = decide(
                POLICY,
                now,
                a,
                assigned=False,
                can_mine=True,
                ai_micros_per_kwh=ai,
                mining_micros_per_kwh=mining,
            )
            if nxt.preference != a.preference:
                flips.append(now)
            a = nxt
        return flips

    assert run(8) == []
    flips = run(30)
    assert flips and all(b - a >= POLICY.min_dwell_s for a, b in itertools.pairwise(flips))
    assert len(flips) <= 3600 / POLICY.min_dwell_s + 1


def test_dwell_is_respected_after_a_switch() -> None:
    a = arb(pref=P_AI, now=0.0)
    a = decide(
        POLICY, 0.0, a, assigned=False, can_mine=True, ai_micros_per_kwh=1, mining_micros_per_kwh=9
    )
    assert a.preference == P_MINING and a.state == MINING
    # AI at once pays 10x more; the preference holds for the whole dwell, then goes back.
    for now, expected in [(1.0, P_MINING), (59.0, P_MINING), (60.0, P_AI)]:
        a = decide(
            POLICY,
            now,
            a,
            assigned=False,
            can_mine=True,
            ai_micros_per_kwh=90,
            mining_micros_per_kwh=9,
        )
        assert a.preference == expected, now


# --- the activity of a GPU ------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "assigned", "can_mine", "expected", "since_now"),
    [
        (arb(IDLE, age_s=5, pref=P_MINING), True, True, AI, True),  # an assignment always wins
        (arb(MINING, age_s=5, pref=P_MINING), True, True, AI, True),  # ... over a young miner too
        (arb(AI, age_s=5), False, False, IDLE, True),  # no miner configured: idle
        (arb(IDLE, age_s=5), False, True, IDLE, False),  # AI preferred: wait a dwell for work
        (arb(IDLE, age_s=60), False, True, MINING, True),  # then mine as a filler
        (arb(AI, age_s=500), False, True, IDLE, True),  # attempt over: idle first (no flapping)
        (arb(AI, age_s=500, pref=P_MINING), False, True, MINING, True),  # mining pays: at once
        (arb(IDLE, age_s=1, pref=P_MINING), False, True, MINING, True),
        (arb(MINING, age_s=1), False, True, MINING, False),  # a filler miner keeps running
        (arb(MINING, age_s=1), False, False, IDLE, True),  # command gone / restart backoff
    ],
)
def test_activity_table(
    current: Arbitration, assigned: bool, can_mine: bool, expected: GpuState, since_now: bool
) -> None:
    ai = mining = 500_000  # equal: the preference does not move
    out = decide(
        POLICY,
        10_000.0,
        current,
        assigned=assigned,
        can_mine=can_mine,
        ai_micros_per_kwh=ai,
        mining_micros_per_kwh=mining,
    )
    assert out.state == expected
    assert out.since == (10_000.0 if since_now else current.since)
    assert out.preference == current.preference


def test_back_to_back_jobs_do_not_restart_the_miner() -> None:
    """AI preferred, a 50 s job every 55 s (gaps of 5 s < the 60 s dwell): the miner never
    starts; once the jobs stop, it starts one dwell later."""
    a = initial(0.0, 800_000, 200_000)
    states = []
    for second in range(0, 400):
        busy = second < 275 and second % 55 < 50
        a = decide(
            POLICY,
            float(second),
            a,
            assigned=busy,
            can_mine=True,
            ai_micros_per_kwh=800_000,
            mining_micros_per_kwh=200_000,
        )
        states.append(a.state)
    # The last job ends at 270 s: idle for the 60 s dwell, mining from 330 s.
    assert MINING not in states[:330]
    assert states[270:330] == [IDLE] * 60 and states[330:] == [MINING] * 70


def test_ai_revenue_per_kwh_is_the_ask_over_the_power_limit() -> None:
    gpu = SimulatedBackend("RTX3090").gpus()[0]  # 350 W
    # 250,000 µ$/GPU-h / 0.35 kW = 714,285.7 → 714,285 µ$/kWh ($0.714/kWh)
    assert ai_micros_per_kwh(250_000, gpu) == 714_285
    from dataclasses import replace

    no_limit = replace(gpu, power_limit_watts=0)  # NVML without a limit: catalogue watts
    assert ai_micros_per_kwh(250_000, no_limit) == 714_285
    assert ai_micros_per_kwh(250_000, replace(no_limit, model="Mystery 9000")) == 0


# --- power model and config ------------------------------------------------------------


def test_a_mining_gpu_draws_near_board_power_and_is_metered_exactly() -> None:
    clock = FakeClock()
    backend = SimulatedBackend("RTX3090", clock=clock)
    backend.set_load([0], Load.MINING)
    # 25 W idle + (350 - 25) x 0.95 = 333.75 W, flat
    assert backend.power_watts(0) == pytest.approx(333.75)
    t = backend.telemetry(0)
    assert t.utilization_ratio is not None and t.utilization_ratio > 0.9
    e0 = backend.energy_millijoules(0)
    clock.advance(10.0)
    expected = numeric_integral_j(backend, 0, Load.MINING, clock.t - 10, clock.t)
    assert (backend.energy_millijoules(0) - e0) / 1000 == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(3337.5)


def test_mining_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'broker_address = "b:1"\n'
        'enrollment_token = "t"\n'
        "[mining]\n"
        'command = ["t-rex", "-a", "ethash", "-d", "{gpu}"]\n'
        'revenue_usd_per_kwh = "0.09"\n'
        "min_dwell_s = 300\n"
        "hysteresis_percent = 15\n"
        '[mining.models."RTX 3090"]\n'
        'revenue_usd_per_kwh = "0.2"\n'
        "[mining.models.A4000]\n"
        'command = ["lolminer", "--devices", "{gpu}"]\n'
    )
    cfg = AgentConfig(**read_config_file(path))  # type: ignore[arg-type]
    m = cfg.mining
    assert m is not None and m.min_dwell_s == 300 and m.hysteresis_percent == 15
    assert m.command_for("RTX 3060") == ("t-rex", "-a", "ethash", "-d", "{gpu}")
    assert m.revenue_for("RTX 3060") == 90_000
    assert m.revenue_for("rtx3090") == 200_000  # models match without spaces and case
    assert m.command_for("RTX 3090") == m.command  # revenue override only
    assert m.command_for("A4000") == ("lolminer", "--devices", "{gpu}")
    assert m.revenue_for("A4000") == 90_000

    for bad, words in [
        ("[mining]\nrevenue_usd_per_kwh = 0.09\n", "as a string"),
        ('[mining]\ncommand = "t-rex"\n', "list of strings"),
        ("[mining]\ndwell = 3\n", "unknown key mining.'dwell'"),
        ("[mining]\nmin_dwell_s = 0\n", "mining.min_dwell_s must be a positive"),
        ("[mining]\nhysteresis_percent = 0.1\n", "whole number"),
        ('[mining.models."RTX 3090"]\nrevenue = "1"\n', "unknown key"),
    ]:
        path.write_text(bad)
        with pytest.raises(ConfigError, match=words):
            read_config_file(path)
