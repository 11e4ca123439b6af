"""The broker's clock: a step of the host's wall clock neither expires nor extends a lease."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from broker.clock import BrokerClock
from broker.core import BrokerCore
from broker.events import Heartbeat, Tick, WorkerRegistered
from broker.model import GpuInfo, WorkerState
from broker.service import BrokerService
from broker.store import FarmRow, Store
from harness.broker_fixtures import healthy

HOUR = 3600.0
TTL = 15.0


class FakeTime:
    """time.time and time.monotonic of a host whose wall clock an operator can step."""

    def __init__(self) -> None:
        self.wall_offset = 0.0
        self.elapsed = 0.0
        self.start = 1_700_000_000.0

    def wall(self) -> float:
        return self.start + self.elapsed + self.wall_offset

    def monotonic(self) -> float:
        return 50.0 + self.elapsed


def test_the_clock_follows_elapsed_time_not_steps_of_the_wall_clock():
    t = FakeTime()
    clock = BrokerClock(wall=t.wall, monotonic=t.monotonic)
    assert clock() == t.start
    t.elapsed = 10.0
    assert clock() == t.start + 10.0
    t.wall_offset = HOUR
    assert clock() == t.start + 10.0
    t.wall_offset = -HOUR
    t.elapsed = 12.5
    assert clock() == t.start + 12.5


def test_the_default_clock_ignores_a_step_of_time_time(monkeypatch: pytest.MonkeyPatch):
    clock = BrokerClock()
    before = clock()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + HOUR)
    assert 0.0 <= clock() - before < 60.0


def _service(tmp_path: Path, clock) -> BrokerService:  # type: ignore[no-untyped-def]
    store = Store(f"sqlite:///{tmp_path / 'broker.db'}")
    store.create_farm(FarmRow(id="f", display_name="farm", enrollment_token_sha256="x"))
    return BrokerService(BrokerCore(lease_ttl_s=TTL), store, clock=clock)


async def _lease_after_step(svc: BrokerService, t: FakeTime, step_s: float) -> list[WorkerState]:
    """Register, heartbeat, step the wall clock, then tick just before and after the TTL."""
    gpus = (GpuInfo(0, "GPU-0", "RTX 3090", 24576, measurement=healthy()),)
    await svc.apply(WorkerRegistered(svc.clock(), "w", "f", "rig", "1", gpus))
    t.elapsed = 5.0
    await svc.apply(Heartbeat(svc.clock(), "w"))  # the lease now runs until 5 + TTL
    t.wall_offset = step_s
    states = []
    for elapsed in (6.0, 5.0 + TTL - 0.5, 5.0 + TTL + 0.5):
        t.elapsed = elapsed
        await svc.apply(Tick(svc.clock()))
        states.append(svc.core.workers["w"].state)
    return states


@pytest.mark.parametrize("step_s", [HOUR, -HOUR])
def test_a_wall_clock_step_neither_expires_nor_extends_a_lease(tmp_path: Path, step_s: float):
    t = FakeTime()
    svc = _service(tmp_path, BrokerClock(wall=t.wall, monotonic=t.monotonic))
    states = asyncio.run(_lease_after_step(svc, t, step_s))
    # Still leased just before the TTL (not expired by +1 h), lost just after (not extended).
    assert states == [WorkerState.ONLINE, WorkerState.ONLINE, WorkerState.OFFLINE]
    svc.store.close()


def test_a_wall_clock_broker_would_have_expired_the_lease(tmp_path: Path):
    """The same step with time.time as the broker's clock: the lease is gone at once."""
    t = FakeTime()
    svc = _service(tmp_path, t.wall)
    states = asyncio.run(_lease_after_step(svc, t, HOUR))
    assert states[0] == WorkerState.OFFLINE
    svc.store.close()
