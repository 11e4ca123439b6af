"""The GPU-health shell (``health_loop.py``) against a simulated rig and a fake broker call:
polling -> GpuFaulted, reports retried until taken, probation self-tests judged."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from harness.agent_fixtures import FakeClock
from rigshift.scoring import Measurement
from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.events import Event, GpuFaulted, ProbationDue, SelfTestDone
from worker_agent.gpu import GpuBackend, SimulatedBackend
from worker_agent.health import Fault, HealthConfig
from worker_agent.health_loop import HealthShell, health_protos
from worker_agent.quarantine import GpuHealthView
from worker_agent.selftest import measure_gpus


def shell(
    backend: GpuBackend,
    events: list[Event],
    send_results: list[bool] | None = None,
    sent: list[list[ws.GpuHealth]] | None = None,
    taken: asyncio.Event | None = None,
) -> HealthShell:
    results = list(send_results or [])

    async def send(gpus: list[ws.GpuHealth]) -> bool:
        if sent is not None:
            sent.append(gpus)
        ok = results.pop(0) if results else True
        if ok and taken is not None:
            taken.set()
        return ok

    return HealthShell(
        backend,
        HealthConfig(interval_s=0.01),
        handle=events.append,
        report=lambda: [ws.GpuHealth(index=1, quarantined=True, reason="XID 79")],
        send=send,
        retry_min_s=0.001,
        retry_max_s=0.002,
    )


def test_a_fault_on_one_gpu_becomes_gpu_faulted_for_that_gpu() -> None:
    clock = FakeClock()
    backend = SimulatedBackend("RTX3090x2", clock=clock, faults=[Fault(1, "xid79", 5.0)])
    events: list[Event] = []
    s = shell(backend, events)
    asyncio.run(s.poll_once())
    assert [type(e) for e in events] == [ProbationDue]
    clock.advance(5.0)
    events.clear()
    asyncio.run(s.poll_once())
    faulted = [e for e in events if isinstance(e, GpuFaulted)]
    assert [(e.index, e.reason) for e in faulted] == [(1, "XID 79: GPU has fallen off the bus")]
    assert faulted[0].wall > 0 and isinstance(events[-1], ProbationDue)


def test_reports_are_retried_until_taken_and_coalesced() -> None:
    backend = SimulatedBackend("RTX3090x2", clock=FakeClock())
    sent: list[list[ws.GpuHealth]] = []

    async def main() -> None:
        taken = asyncio.Event()
        s = shell(backend, [], send_results=[False, False, True], sent=sent, taken=taken)
        task = asyncio.create_task(s.report_loop())
        s.request_report()
        s.request_report()  # asked twice before the first try: one whole report suffices
        await asyncio.wait_for(taken.wait(), 10)
        task.cancel()
        assert s.reports_taken == 1

    asyncio.run(main())
    assert len(sent) == 3
    assert sent[-1][0].reason == "XID 79"


@pytest.mark.parametrize(
    ("faults", "passed", "reason"),
    [
        ([], True, ""),
        ([Fault(0, "xid79", 0)], True, ""),  # one-off: the card is fine afterwards
        ([Fault(0, "lost", 0)], False, "self-test failed: GPU not responding"),
        ([Fault(0, "impostor", 0)], False, "measures short of its claimed model"),
    ],
)
def test_probation_selftest_is_judged(faults: list[Fault], passed: bool, reason: str) -> None:
    backend = SimulatedBackend("RTX3090", clock=FakeClock(), faults=faults)
    events: list[Event] = []
    s = shell(backend, events)
    s.measure = measure_gpus

    async def main() -> None:
        await s.run_selftest(0)

    asyncio.run(main())
    (done,) = events
    assert isinstance(done, SelfTestDone)
    assert (done.index, done.passed) == (0, passed)
    assert done.reason.startswith(reason)
    assert done.measurement is not None


def test_a_selftest_that_crashes_fails() -> None:
    backend = SimulatedBackend("RTX3090", clock=FakeClock())
    events: list[Event] = []
    s = shell(backend, events)

    async def broken(
        backend: GpuBackend, indices: Sequence[int], *, budget_s: float
    ) -> dict[int, Measurement]:
        raise RuntimeError("CUDA error: out of memory")

    s.measure = broken

    async def main() -> None:
        await s.run_selftest(0)

    asyncio.run(main())
    (done,) = events
    assert isinstance(done, SelfTestDone) and not done.passed
    assert "CUDA error" in done.reason


def test_health_protos() -> None:
    m = Measurement(fp16_gflops=1000, usable_vram_mb=20_000, method="simulated", measured_at=5.0)
    (h, ok) = health_protos(
        [
            GpuHealthView(1, True, "XID 79", 1_700_000_000.0, 2, False, m),
            GpuHealthView(0, False, strikes=1),
        ]
    )
    assert (h.index, h.quarantined, h.reason, h.strikes, h.reinstate_required) == (
        1,
        True,
        "XID 79",
        2,
        False,
    )
    assert h.since.seconds == 1_700_000_000
    assert h.measurement.fp16_gflops == 1000 and h.measurement.measure_time.seconds == 5
    assert not ok.quarantined and not ok.HasField("since") and not ok.HasField("measurement")
