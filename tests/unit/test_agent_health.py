"""GPU health: classification (``health.py``), the simulated faults and SPEC mounting."""

from __future__ import annotations

import pytest

from harness.agent_fixtures import FakeClock
from worker_agent.gpu import OVERHEAT_HOLD_S, SIM_SLOWDOWN_C, SimulatedBackend, parse_spec
from worker_agent.health import (
    Fault,
    HealthConfig,
    HealthObservation,
    HealthWatch,
    Observed,
    classify,
    parse_fault,
)

CFG = HealthConfig(overheat_s=30.0, power_silence_s=60.0)


def obs(kind: Observed, value: float = 0.0, **kw: object) -> HealthObservation:
    return HealthObservation(0, kind, 100.0, value, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("observation", "held_s", "critical", "reason"),
    [
        # application XIDs: the job's fault, not the card's (as NVIDIA's device plugin)
        (obs(Observed.XID, 13), 0, False, ""),
        (obs(Observed.XID, 31), 0, False, ""),
        (obs(Observed.XID, 43), 0, False, ""),
        (obs(Observed.XID, 45), 0, False, ""),
        (obs(Observed.XID, 68), 0, False, ""),
        (obs(Observed.XID, 109), 0, False, ""),
        (obs(Observed.XID, 79), 0, True, "XID 79: GPU has fallen off the bus"),
        (obs(Observed.XID, 48), 0, True, "XID 48: double-bit ECC error"),
        (obs(Observed.XID, 999), 0, True, "XID 999"),
        (obs(Observed.ECC_DBE, 2), 0, True, "2 double-bit ECC error(s)"),
        (obs(Observed.ECC_DBE, 0), 0, False, ""),
        (obs(Observed.RETIRED_PENDING), 0, True, "retired memory pages pending"),
        (obs(Observed.LOST), 0, True, "GPU is lost"),
        (obs(Observed.TEMPERATURE, 95, threshold=90.0), 29.9, False, ""),
        (obs(Observed.TEMPERATURE, 95, threshold=90.0), 30, True, "temperature 95 °C"),
        (obs(Observed.TEMPERATURE, 70, threshold=90.0), 300, False, ""),
        (obs(Observed.TEMPERATURE, 120, threshold=None), 300, False, ""),  # no threshold
        (obs(Observed.POWER, present=False), 59, False, ""),
        (obs(Observed.POWER, present=False), 60, True, "no power reading for 60 s"),
        (obs(Observed.POWER, present=True), 600, False, ""),
    ],
)
def test_classify(
    observation: HealthObservation, held_s: float, critical: bool, reason: str
) -> None:
    verdict = classify(observation, held_s=held_s, config=CFG)
    assert verdict.critical is critical
    assert verdict.reason.startswith(reason)


def test_watch_needs_a_sustained_overheat_and_resets_when_it_cools() -> None:
    watch = HealthWatch(CFG)

    def temp(at: float, c: float) -> bool:
        return watch.observe(HealthObservation(1, Observed.TEMPERATURE, at, c, 90.0)).critical

    assert not temp(0, 95) and not temp(20, 95)
    assert not temp(25, 60)  # cooled: the count starts again
    assert not temp(30, 95) and not temp(59, 95)
    assert temp(60, 95)


def test_watch_power_silence_only_after_power_was_seen() -> None:
    watch = HealthWatch(CFG)

    def power(index: int, at: float, present: bool) -> bool:
        return watch.observe(HealthObservation(index, Observed.POWER, at, present=present)).critical

    assert not power(0, 0, False) and not power(0, 1000, False)  # never reported power
    assert not power(1, 0, True)
    assert not power(1, 10, False) and not power(1, 69, False)
    assert power(1, 70, False)
    watch.forget(1)
    assert not power(1, 71, False)  # forgotten: it never reported power since


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("1:xid79:30", Fault(1, "xid79", 30.0)),
        ("0:ECC-DBE:0.5", Fault(0, "ecc-dbe", 0.5)),
        ("3:impostor:0", Fault(3, "impostor", 0.0)),
    ],
)
def test_parse_fault(text: str, fault: Fault) -> None:
    assert parse_fault(text) == fault


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1:xid79", "GPU:KIND:AFTER_S"),
        ("a:xid79:3", "GPU:KIND:AFTER_S"),
        ("1:melt:3", "unknown fault kind 'melt'"),
        ("-1:lost:3", "must not be negative"),
        ("1:lost:-3", "must not be negative"),
    ],
)
def test_parse_fault_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_fault(text)


def kinds(backend: SimulatedBackend, index: int) -> list[tuple[Observed, float]]:
    return [
        (o.kind, o.value)
        for o in backend.health(index)
        if o.kind not in (Observed.TEMPERATURE, Observed.POWER)
    ]


@pytest.mark.parametrize(
    ("kind", "seen"),
    [
        ("xid79", (Observed.XID, 79.0)),
        ("xid48", (Observed.XID, 48.0)),
        ("ecc-dbe", (Observed.ECC_DBE, 1.0)),
    ],
)
def test_one_off_faults_strike_once_on_their_gpu(kind: str, seen: tuple[Observed, float]) -> None:
    clock = FakeClock()
    backend = SimulatedBackend("RTX3090x2", clock=clock, faults=[Fault(1, kind, 10.0)])
    assert kinds(backend, 1) == []
    clock.advance(10.0)
    assert kinds(backend, 0) == []  # the neighbour is untouched
    assert kinds(backend, 1) == [seen]
    assert kinds(backend, 1) == []  # one-off
    assert backend.selftest_factor(1) == 1.0  # a later self-test passes


def test_lost_persists_and_fails_the_selftest() -> None:
    clock = FakeClock()
    backend = SimulatedBackend("RTX3090x2", clock=clock, faults=[Fault(0, "lost", 5.0)])
    assert backend.selftest_factor(0) == 1.0
    clock.advance(5.0)
    for _ in range(2):
        assert [o.kind for o in backend.health(0)] == [Observed.LOST]
    assert backend.selftest_factor(0) == 0.0 and backend.selftest_factor(1) == 1.0


def test_overheat_holds_then_cools() -> None:
    clock = FakeClock()
    backend = SimulatedBackend("RTX3090", clock=clock, faults=[Fault(0, "overheat", 1.0)])

    def temperature() -> float:
        (t,) = [o for o in backend.health(0) if o.kind is Observed.TEMPERATURE]
        assert t.threshold == SIM_SLOWDOWN_C
        return t.value

    assert temperature() < SIM_SLOWDOWN_C
    clock.advance(1.0)
    assert temperature() > SIM_SLOWDOWN_C
    assert backend.telemetry(0).temperature_celsius == temperature()
    clock.advance(OVERHEAT_HOLD_S - 0.5)
    assert temperature() > SIM_SLOWDOWN_C
    clock.advance(1.0)
    assert temperature() < SIM_SLOWDOWN_C


def test_impostor_changes_no_reading_but_measures_a_third() -> None:
    backend = SimulatedBackend("RTX3090", clock=FakeClock(), faults=[Fault(0, "impostor", 0)])
    assert kinds(backend, 0) == []
    assert backend.selftest_factor(0) == pytest.approx(1 / 3)


def test_a_fault_on_a_gpu_the_rig_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match="has 2 GPU"):
        SimulatedBackend("RTX3090x2", faults=[Fault(2, "lost", 0)])


@pytest.mark.parametrize(
    ("spec", "width", "generation"),
    [("RTX3090x4", 1, 1), ("RTX3090x4@x16", 16, 4), ("RTX3060x2@x16", 16, 4), ("RTX3060", 1, 1)],
)
def test_mounting_sets_link_width_and_generation(spec: str, width: int, generation: int) -> None:
    models = parse_spec(spec)
    assert {m.pcie_link_width for m in models} == {width}
    gpus = SimulatedBackend(spec).gpus()
    assert {(g.pcie_link_width, g.pcie_generation) for g in gpus} == {(width, generation)}


@pytest.mark.parametrize("spec", ["RTX3090x4@x3", "RTX3090@", "RTX3090@pcie"])
def test_bad_mounting_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="mounting"):
        parse_spec(spec)
