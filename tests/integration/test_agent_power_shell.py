"""Power caps and curtailment with a real agent against the scripted broker (issue 16):
an Assignment with power_limit_watts runs capped (the simulated backend's limit, and less
energy than an uncapped attempt of the same duration), the operator's limit comes back
when it ends; a Curtail instruction stops the miner and starts none until it ends."""

from __future__ import annotations

import sys
from pathlib import Path

from scripted_broker import FakeBroker, run_session, script, until

from harness.agent_fixtures import FakeClock, make_assignment
from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.agent import Agent
from worker_agent.config import MiningConfig
from worker_agent.gpu import SimulatedBackend
from worker_agent.mining import GpuState

LONG = script("import time", "print('up', flush=True)", "time.sleep(60)")


def test_an_assignment_with_a_power_limit_runs_capped_and_the_limit_is_restored(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    backend = SimulatedBackend("RTX3090x2", seed="p", clock=clock)

    async def body(fake: FakeBroker, agent: Agent) -> None:
        capped = make_assignment("jobs/capped", gpus=[0], command=LONG)
        capped.power_limit_watts = 200
        fake.push(assignment=capped)
        fake.push(assignment=make_assignment("jobs/full", gpus=[1], command=LONG))
        await until(lambda: "up" in fake.output("jobs/capped") and "up" in fake.output("jobs/full"))
        await until(lambda: agent.machine.running[("jobs/full", 1)].started)
        assert backend.power_limit(0) == 200 and backend.power_limit(1) == 350
        clock.advance(70.0)  # ten periods of the training wave, on both GPUs
        for job in ("jobs/capped", "jobs/full"):
            fake.push(cancellation=ws.Cancellation(job=job, attempt=1, reason="enough"))
        await until(
            lambda: (
                fake.finished("jobs/capped") is not None and fake.finished("jobs/full") is not None
            ),
            what="both attempts to end",
        )
        await until(lambda: backend.power_limit(0) == 350, what="the operator's limit again")

    fake = run_session(tmp_path, body, backend=backend)
    capped, full = fake.finished("jobs/capped"), fake.finished("jobs/full")
    assert capped is not None and full is not None
    # 200 W flat under the cap against the uncapped mean of 317.5 W, for the same 70 s
    assert capped.energy_joules == 200 * 70
    assert abs(full.energy_joules - 317.5 * 70) <= 1
    reg = fake.registrations[0].gpus[0]
    assert reg.power_limit_settable
    assert [p.limit_watts for p in reg.power_curve] == [175, 210, 245, 280, 315, 350]


def test_a_curtail_instruction_stops_the_miner_and_none_starts_until_it_ends(
    tmp_path: Path,
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    miner = tmp_path / "miner.py"
    miner.write_text(
        "import os, signal, sys, time\n"
        "def note(w):\n"
        "    open(os.path.join(sys.argv[1], 'miner.log'), 'a').write(w + '\\n')\n"
        "signal.signal(signal.SIGTERM, lambda *_: (note('stop'), sys.exit(0)))\n"
        "note('start')\n"
        "while True:\n"
        "    time.sleep(0.05)\n"
    )
    log = marks / "miner.log"

    def notes() -> list[str]:
        return log.read_text().split() if log.exists() else []

    async def body(fake: FakeBroker, agent: Agent) -> None:
        mining = agent.mining
        assert mining is not None
        await until(lambda: notes() == ["start"], what="the idle GPU to mine")
        fake.push(curtail=ws.Curtail(active=True, reason="grid event"))
        await until(lambda: notes() == ["start", "stop"], what="the miner to stop")
        await until(lambda: not mining.held_by_miners(), what="the miner reaped")
        ticks = 0
        real_tick = mining.tick

        def counting(busy: set[int]) -> None:
            nonlocal ticks
            ticks += 1
            real_tick(busy)

        mining.tick = counting  # type: ignore[method-assign]
        await until(lambda: ticks >= 5, what="five mining ticks")
        assert notes() == ["start", "stop"] and mining.state(0) == GpuState.IDLE
        assert agent.snapshot.curtailed
        # a new stream's Reconcile says the window is still on: still nothing
        fake.push(reconcile=ws.Reconcile(curtail=ws.Curtail(active=True)))
        fake.push(curtail=ws.Curtail(active=False))
        await until(lambda: notes() == ["start", "stop", "start"], what="mining again")
        assert not mining.curtailed()

    run_session(
        tmp_path,
        body,
        spec="RTX3060",
        metrics_listen="127.0.0.1:0",
        mining=MiningConfig(
            command=(sys.executable, str(miner), str(marks)),
            revenue_micros_per_kwh=900_000,  # mining pays more than AI: mines at once
            min_dwell_s=0.1,
            check_interval_s=0.05,
            stop_grace_s=1.0,
        ),
    )
