"""The agent's session (issue 17) against the scripted broker: renewals as messages on
WorkerService.Session with the status only when wanted or changed, and the fallback to
Heartbeat + StreamInstructions against a broker without Session (and back once it has one)."""

from __future__ import annotations

from pathlib import Path

from scripted_broker import FakeBroker, run_session, script, until

from harness.agent_fixtures import make_assignment
from worker_agent.agent import Agent


def test_the_agent_renews_on_the_session_with_the_status_only_when_wanted(tmp_path: Path):
    async def body(fake: FakeBroker, agent: Agent) -> None:
        await until(lambda: fake.heartbeats >= 5, what="renewals on the session")
        assert agent.session.protocol == "session"
        a = make_assignment("jobs/s", command=script("print('hi')"))
        fake.push(assignment=a)  # instructions share the stream with the answers
        await until(lambda: fake.finished("jobs/s"), what="the job to finish")

    fake = run_session(tmp_path, body, session_protocol=True)
    assert fake.unary_heartbeats == 0  # no Heartbeat call at all
    first = fake.session_requests[0]
    assert first.worker == "workers/w1" and first.HasField("status")  # a new registration
    later = fake.session_requests[3:]
    assert later and not any(r.HasField("status") for r in later)  # unchanged: not sent again
    assert fake.output("jobs/s") == "hi\n"


def test_the_agent_falls_back_to_heartbeat_calls_against_a_broker_without_session(
    tmp_path: Path,
):
    async def body(fake: FakeBroker, agent: Agent) -> None:
        await until(lambda: fake.unary_heartbeats >= 3, what="unary heartbeats")
        assert agent.session.protocol == "unary"
        a = make_assignment("jobs/u", command=script("print('old broker')"))
        fake.push(assignment=a)  # on StreamInstructions
        await until(lambda: fake.finished("jobs/u"), what="the job to finish")
        # The broker is upgraded: once the old stream ends, the agent tries Session again.
        fake.session_supported = True
        fake.streams[-1].put_nowait(None)
        await until(lambda: fake.sessions >= 1, what="a session")
        before = fake.heartbeats
        await until(lambda: fake.heartbeats >= before + 3, what="renewals on the session")
        assert agent.session.protocol == "session"

    fake = run_session(tmp_path, body, session=False, session_protocol=True)
    assert fake.output("jobs/u") == "old broker\n"
