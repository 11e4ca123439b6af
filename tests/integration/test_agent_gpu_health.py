"""Per-GPU quarantine with a real agent against the scripted broker: a fault on GPU 1
stops only GPU 1's attempt and reports the health (retried until taken), GPU 0's attempt
keeps running, work on GPU 1 is refused, and the operator's Reinstate brings it back."""

from __future__ import annotations

from pathlib import Path

from scripted_broker import FakeBroker, run_session, script, until

from harness.agent_fixtures import FakeClock, make_assignment
from rigshift.v1 import worker_service_pb2 as ws
from worker_agent.agent import Agent
from worker_agent.gpu import SimulatedBackend
from worker_agent.health import Fault, HealthConfig
from worker_agent.selftest import measure_gpus

LONG = script("import time", "print('up', flush=True)", "time.sleep(60)")
XID79 = "XID 79: GPU has fallen off the bus"


def test_a_fault_quarantines_one_gpu_and_stops_only_its_attempt(tmp_path: Path) -> None:
    clock = FakeClock()
    backend = SimulatedBackend(
        "RTX3090x2", seed="h", clock=clock, faults=[Fault(1, "xid79", 100.0)]
    )

    async def body(fake: FakeBroker, agent: Agent) -> None:
        assert agent.health is not None
        agent.health.measure = measure_gpus  # the simulated figures, deterministic
        fake.push(assignment=make_assignment("jobs/a", gpus=[0], command=LONG))
        fake.push(assignment=make_assignment("jobs/b", gpus=[1], command=LONG))
        await until(lambda: "up" in fake.output("jobs/a") and "up" in fake.output("jobs/b"))
        fake.fail_health_reports = 1  # the first report is refused: it is sent again
        clock.advance(100.0)  # the XID strikes GPU 1

        await until(lambda: fake.health(1) is not None, what="the health report")
        assert fake.fail_health_reports == 0  # refused once, then sent again and taken
        health = fake.health(1)
        assert health is not None
        assert (health.quarantined, health.reason, health.strikes) == (True, XID79, 1)
        assert health.since.seconds > 0 and not health.reinstate_required
        assert fake.health(0) is None  # GPU 0 is healthy: not in the report
        await until(lambda: ("jobs/b", 1) not in agent.machine.running, what="b stopped")
        # stopped without a report: the broker requeues it when it takes the health report
        assert fake.finished("jobs/b") is None
        held = agent.machine.running.get(("jobs/a", 1))
        assert held is not None and held.started and not held.stopping
        assert fake.finished("jobs/a") is None

        # new work on the quarantined GPU is refused as the rig's setup failure
        fake.push(assignment=make_assignment("jobs/c", gpus=[1], command=LONG))
        await until(lambda: fake.finished("jobs/c") is not None, what="c refused")
        finished = fake.finished("jobs/c")
        assert finished is not None and finished.cause == ws.Finished.SETUP_RIG
        assert XID79 in finished.message

        # the operator reinstates it: re-tested at once, passes, reported back
        taken = len(fake.health_reports)
        fake.push(reinstate=ws.Reinstate(gpu_index=1, requested_by="users/op"))
        await until(
            lambda: len(fake.health_reports) > taken and not fake.health(1).quarantined,  # type: ignore[union-attr]
            what="GPU 1 back",
        )
        back = fake.health(1)
        assert back is not None and back.measurement.method == "simulated"
        assert back.strikes == 0
        assert agent.machine.quarantine.quarantined() == frozenset()
        held = agent.machine.running.get(("jobs/a", 1))
        assert held is not None and not held.stopping  # GPU 0's attempt ran throughout

    fake = run_session(
        tmp_path, body, backend=backend, health=HealthConfig(interval_s=0.05, probation_s=3600)
    )
    assert fake.registrations[0].gpus[1].pcie_generation == 1
