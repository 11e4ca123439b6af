"""The agent against a scripted broker (``scripted_broker.py``) when things fail: the
lease lost to unanswered heartbeats, a black-holed broker, a broker down past the TTL,
the agent's own process frozen, the wall clock stepped, one of its loops failing
(issue 12)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from scripted_broker import FakeBroker, run_session, script, until

from harness.agent_fixtures import make_assignment
from worker_agent.agent import Agent, AgentError
from worker_agent.process import alive as _alive


@pytest.mark.parametrize("session", [True, False], ids=["session", "unary"])
def test_lost_lease_stops_jobs_without_a_final_report(tmp_path: Path, session: bool) -> None:
    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/l", command=script("import time; time.sleep(600)"))
        fake.reconcile = [a]  # the broker still lists it until the lease expires
        fake.push(assignment=a)
        await until(lambda: "started" in fake.kinds("jobs/l"), what="started")
        fake.heartbeat_error = grpc.StatusCode.UNAVAILABLE
        # stopped before the TTL of 3 s (less the kill grace of 1 s + 0.5 s) is over
        await until(lambda: not agent.runner.runs, timeout=8.0, what="stopped")  # type: ignore[union-attr]
        fake.reconcile = []  # the broker requeued it
        fake.heartbeat_error = None

    fake = run_session(tmp_path, body, session=session, session_protocol=session)
    assert fake.finished("jobs/l") is None  # the broker requeues it; no FAILED report


@pytest.mark.parametrize("session", [True, False], ids=["session", "unary"])
def test_a_black_holed_broker_does_not_make_the_agent_drain(tmp_path: Path, session: bool) -> None:
    """Issue 12: heartbeats time out while the instruction stream hangs without data (a
    half-open connection). The heartbeat loop resets the stream; that must only make the
    stream reconnect. Before the fix the reset ended the stream task as cancelled, and
    Agent.run read "a loop ended" and drained the rig."""
    cmd = script("import time; time.sleep(4); print('done')")

    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/bh", command=cmd)
        fake.reconcile = [a]  # what a reconnected stream hears: it still runs here
        fake.push(assignment=a)
        await until(lambda: "started" in fake.kinds("jobs/bh"), what="started")
        streams = len(fake.streams)
        fake.heartbeat_delay_s = 5.0  # the agent's deadline is 1 s: DEADLINE_EXCEEDED
        await asyncio.sleep(2.5)
        fake.heartbeat_delay_s = 0.0  # the link heals
        before = fake.heartbeats
        await until(lambda: fake.heartbeats > before + 2, what="heartbeats again")
        assert agent.state == "online"  # not "draining"
        assert not agent._stopping.is_set()
        await until(lambda: len(fake.streams) > streams, what="a new instruction stream")
        await until(lambda: fake.finished("jobs/bh"), what="the job to finish")
        assert agent.state == "online"

    fake = run_session(
        tmp_path, body, broker_ttl_s=30, lease_ttl_s=30.0, session=session, session_protocol=session
    )
    finished = fake.finished("jobs/bh")
    assert finished is not None and finished.exit_code == 0  # kept running through the cut
    assert fake.output("jobs/bh") == "done\n"


def test_jobs_outlive_a_broker_that_refuses_connections_past_the_ttl(tmp_path: Path) -> None:
    """A port that refuses connections means no broker runs: nobody can requeue the jobs,
    and a broker that starts gives live workers a fresh lease. So the agent keeps its jobs
    past the TTL (for lease_grace_s) and adopts them when the broker is back."""
    cmd = script("import time; time.sleep(7); print('done')")

    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/rs", command=cmd)
        fake.reconcile = [a]
        fake.push(assignment=a)
        await until(lambda: "started" in fake.kinds("jobs/rs"), what="started")
        await fake.stop()
        await asyncio.sleep(3.5)  # past the TTL of 3 s
        assert agent.lease.broker_down
        run = agent.runner.runs.get(("jobs/rs", 1))  # type: ignore[union-attr]
        assert run is not None and not run.stop_reason
        await fake.serve()  # a broker restart: same port, same state
        await until(lambda: fake.finished("jobs/rs"), timeout=15.0, what="finished")

    fake = run_session(tmp_path, body, lease_grace_s=4.0)
    assert fake.finished("jobs/rs").exit_code == 0  # type: ignore[union-attr]
    assert fake.output("jobs/rs") == "done\n"


def test_a_frozen_agent_stops_its_jobs_before_it_reports_anything(tmp_path: Path) -> None:
    """The agent's process stops for longer than the TTL (SIGSTOP, a kernel stall) while its
    job's process goes on; meanwhile the broker requeued the job. Once the agent runs
    again it stops the job at once, without a report, before its first heartbeat."""
    pid_file = tmp_path / "pid"
    cmd = script(
        "import os, time",
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))",
        "time.sleep(600)",
    )

    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/fz", command=cmd)
        fake.reconcile = [a]
        fake.push(assignment=a)
        await until(lambda: pid_file.exists() and pid_file.read_text(), what="pid")
        fake.reconcile = []  # the broker expires the lease meanwhile
        time.sleep(4.0)  # blocks the agent's event loop (and the fake's): frozen past the TTL
        beats = fake.heartbeats
        await until(lambda: not agent.runner.runs, timeout=8.0, what="stopped")  # type: ignore[union-attr]
        assert fake.heartbeats <= beats + 1  # stopped on the first look at the lease
        assert not _alive(int(pid_file.read_text()))

    fake = run_session(tmp_path, body)
    assert "started" in fake.kinds("jobs/fz")
    assert fake.finished("jobs/fz") is None  # never reported: the broker requeued it


class _SteppedTime:
    """The ``time`` module with ``time()`` moved by ``offset_s`` (a wall-clock step).

    Patched into the agent's modules only: grpc.aio turns a call's timeout into a
    wall-clock deadline that its C core converts back with its own clock, so stepping
    Python's ``time.time`` alone would expire every call at once, which a real step
    (moving both clocks) does not."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def time(self) -> float:
        return _REAL_TIME() + self.offset_s


_REAL_TIME = time.time


def test_a_wall_clock_step_neither_expires_nor_extends_the_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker_agent.agent
    import worker_agent.attempts

    clock = _SteppedTime()
    for module in (worker_agent.agent, worker_agent.attempts):
        monkeypatch.setattr(module, "time", clock)
    took: list[float] = []

    async def body(fake: FakeBroker, agent: Agent) -> None:
        a = make_assignment("jobs/ck", command=script("import time; time.sleep(600)"))
        fake.reconcile = [a]
        fake.push(assignment=a)
        await until(lambda: "started" in fake.kinds("jobs/ck"), what="started")
        regs = len(fake.registrations)
        for offset in (3600.0, -3600.0):
            clock.offset_s = offset
            beats = fake.heartbeats
            await until(lambda b=beats: fake.heartbeats >= b + 3, what="heartbeats")
            left = agent.lease.expires_at - time.monotonic()
            assert 0 < left <= 3.0  # the broker's TTL: neither expired nor extended
            assert ("jobs/ck", 1) in agent.runner.runs  # type: ignore[union-attr]
        assert len(fake.registrations) == regs
        # With the clock an hour back, the lease still runs out on time when the broker is
        # silent: TTL 3 s less the stop lead (kill grace 1 s + 0.5 s) after the last answer.
        fake.heartbeat_error = grpc.StatusCode.UNAVAILABLE
        renewed = agent.lease.renewed_at
        await until(lambda: not agent.runner.runs, timeout=10.0, what="stopped")  # type: ignore[union-attr]
        took.append(time.monotonic() - renewed)
        fake.reconcile = []
        fake.heartbeat_error = None

    fake = run_session(tmp_path, body)
    print(f"jobs stopped {took[0]:.2f} s after the last answered heartbeat (due at 1.5 s)")
    assert took[0] >= 1.5  # not earlier than due (later only on a slow machine)
    assert fake.finished("jobs/ck") is None
    events = fake.applied[("jobs/ck", 1)]
    assert events[-1].time.seconds < _REAL_TIME() - 1800  # reports carry the stepped wall clock


def test_a_loop_that_ends_is_restarted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    original = Agent._meter_loop

    async def flaky(self: Agent) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("a bug in the meter")
        await original(self)

    monkeypatch.setattr(Agent, "_meter_loop", flaky)

    async def body(fake: FakeBroker, agent: Agent) -> None:
        await until(lambda: len(calls) >= 2, what="the meter loop restarted")
        assert agent.state == "online"

    run_session(tmp_path, body)


def test_a_loop_that_keeps_failing_stops_the_agent_with_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    import worker_agent.agent
    from worker_agent.supervise import supervise

    async def broken(self: Agent) -> None:
        raise RuntimeError("a bug in the miners' loop")

    monkeypatch.setattr(Agent, "_mining_loop", broken)
    fast = functools.partial(supervise, restart_min_s=0.01, restart_max_s=0.02)
    monkeypatch.setattr(worker_agent.agent, "supervise", fast)
    states: list[str] = []

    async def body(fake: FakeBroker, agent: Agent) -> None:
        assert agent._run_task is not None
        await until(agent._run_task.done, what="the agent to stop")
        states.append(agent.state)

    with pytest.raises(AgentError, match="agent loop mining keeps ending"):
        run_session(tmp_path, body)
    assert states == ["stopped"]  # not drained: the process exits with an error
