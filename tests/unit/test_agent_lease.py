"""The agent's lease view (pure, monotonic times passed in) and its loop supervisor."""

from __future__ import annotations

import asyncio
import logging

import pytest

from worker_agent.lease import Lease, is_refusal
from worker_agent.supervise import LoopFailed, supervise


def lease(renewed_at: float = 100.0) -> Lease:
    # TTL 15 s, 15 s of grace while the broker refuses, 2.5 s to stop the attempts
    return Lease(ttl_s=15.0, grace_s=15.0, stop_lead_s=2.5, renewed_at=renewed_at)


@pytest.mark.parametrize(
    ("refused", "stop_at"),
    [
        (False, 112.5),  # silent broker: 100 + 15 - 2.5, gone before it may requeue at 115
        (True, 130.0),  # refusing broker (not running): 100 + 15 + 15
    ],
)
def test_when_the_attempts_must_stop(refused: bool, stop_at: float) -> None:
    lz = lease()
    assert lz.failed(101.0, refused=refused)  # the first failure
    assert not lz.failed(102.0, refused=refused)
    assert lz.stop_at == stop_at
    assert not lz.must_stop(stop_at - 0.01)
    assert lz.must_stop(stop_at)


def test_a_silent_broker_after_a_refusing_one_gets_no_grace() -> None:
    lz = lease()
    lz.failed(101.0, refused=True)
    lz.failed(103.0, refused=False)  # the broker host answers no more: it may be alive
    assert lz.stop_at == 112.5


def test_an_answer_renews_and_says_how_long_it_failed() -> None:
    lz = lease()
    assert lz.renewed(103.0) is None  # was not failing
    lz.failed(104.0, refused=False)
    assert lz.renewed(110.0) == 7.0  # since the answer before
    assert (lz.renewed_at, lz.broker_down, lz.failing_since) == (110.0, False, None)
    assert lz.expires_at == 125.0
    lz.renewed(109.0)  # an older heartbeat answered late never moves the lease back
    assert lz.renewed_at == 110.0
    assert lz.renewed(140.0) == 30.0  # nothing failed, but nothing was sent: a frozen agent


def test_a_short_lease_caps_the_stop_lead_at_half_the_ttl() -> None:
    lz = Lease(ttl_s=3.0, grace_s=1.0, stop_lead_s=2.5, renewed_at=0.0)
    assert lz.lead_s == 1.5 and lz.stop_at == 1.5


def test_refusals_are_told_from_other_failures() -> None:
    refused = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:5: "
        "Failed to connect to remote host: Connection refused"
    )
    assert is_refusal(refused)
    assert not is_refusal("Deadline Exceeded")
    assert not is_refusal("keepalive watchdog timeout")
    assert not is_refusal(None)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_a_loop_that_ends_is_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def loop() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        if calls == 2:
            return
        await asyncio.sleep(3600)

    async def main() -> None:
        task = asyncio.create_task(supervise("t", loop, restart_min_s=0.01, restart_max_s=0.02))
        while calls < 3:
            await asyncio.sleep(0.01)
        task.cancel()  # the agent stopping: the cancellation goes through
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger="rigshift.agent"):
        run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("agent loop t failed: RuntimeError('boom'); restarting it")
    assert caplog.records[0].exc_info is not None  # with its traceback
    assert messages[1].startswith("agent loop t returned; restarting it")


def test_a_cancellation_raised_from_inside_is_a_loop_that_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """grpc.aio raises CancelledError out of a call cancelled elsewhere: the task was not
    cancelled, so the loop is restarted (this ended the agent's stream loop: issue 12)."""
    calls = 0

    async def loop() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncio.CancelledError
        await asyncio.sleep(3600)

    async def main() -> None:
        task = asyncio.create_task(supervise("s", loop, restart_min_s=0.01, restart_max_s=0.02))
        while calls < 2:
            await asyncio.sleep(0.01)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger="rigshift.agent"):
        run(main())
    assert caplog.records[0].getMessage().startswith("agent loop s was cancelled from inside")


def test_a_loop_that_keeps_ending_fails() -> None:
    async def loop() -> None:
        raise OSError("disk on fire")

    async def main() -> None:
        await supervise("d", loop, restart_min_s=0.001, restart_max_s=0.002, max_restarts=3)

    with pytest.raises(LoopFailed, match="agent loop d keeps ending") as info:
        run(main())
    assert isinstance(info.value.__cause__, OSError)


def test_ends_far_apart_are_restarted_for_ever() -> None:
    now = [0.0]
    calls = 0

    async def loop() -> None:
        nonlocal calls
        calls += 1
        now[0] += 1000.0  # each end comes long after the window of the previous one
        if calls < 20:
            raise RuntimeError("rare")
        await asyncio.sleep(3600)

    async def main() -> None:
        task = asyncio.create_task(
            supervise(
                "r",
                loop,
                restart_min_s=0.001,
                restart_max_s=0.002,
                max_restarts=2,
                window_s=300.0,
                clock=lambda: now[0],
            )
        )
        while calls < 20:
            await asyncio.sleep(0.01)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
