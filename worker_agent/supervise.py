"""Keep the agent's loops alive: a loop that ends is a bug, logged and restarted.

The agent's tasks (heartbeat, stream, reporter, …) are meant to run until the agent
stops. When one returns, raises or ends cancelled without the agent cancelling it (a
cancelled gRPC call raises ``asyncio.CancelledError`` inside the task that awaited it),
:func:`supervise` logs it with its traceback and runs it again after a backoff. A loop
that keeps ending (``max_restarts`` within ``window_s``) is not restarted again:
:class:`LoopFailed` ends the agent with an error, so the process exits non-zero and its
service manager (systemd's ``Restart=on-failure``) starts a fresh one. A rig never
drains or exits cleanly because of a bug in one loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from worker_agent.backoff import Backoff

__all__ = ["LoopFailed", "supervise"]

log = logging.getLogger("rigshift.agent")


class LoopFailed(Exception):
    """A loop of the agent kept ending; the agent must stop with an error."""


def stopping() -> bool:
    """Whether the current task itself is being cancelled (not a call it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def supervise(
    name: str,
    loop: Callable[[], Awaitable[None]],
    *,
    restart_min_s: float = 0.5,
    restart_max_s: float = 10.0,
    max_restarts: int = 5,
    window_s: float = 300.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run ``loop()`` until this task is cancelled, restarting it whenever it ends.

    Raises :class:`LoopFailed` when it ended more than ``max_restarts`` times within
    ``window_s`` seconds.
    """
    backoff = Backoff(restart_min_s, restart_max_s)
    ends: deque[float] = deque()
    while True:
        exc: BaseException | None = None
        try:
            await loop()
            why = "returned"
        except asyncio.CancelledError as err:
            if stopping():
                raise
            why, exc = "was cancelled from inside", err
        except Exception as err:
            why, exc = f"failed: {err!r}", err
        now = clock()
        ends.append(now)
        while ends and ends[0] < now - window_s:
            ends.popleft()
        if len(ends) == 1:
            backoff.reset()  # the first end in a while: restart soon
        if len(ends) > max_restarts:
            log.error(
                "agent loop %s %s; it ended %d times in %.0f s: giving up",
                *(name, why, len(ends), window_s),
                exc_info=exc,
            )
            raise LoopFailed(f"agent loop {name} keeps ending (last: {why})") from exc
        delay = backoff.next_delay()
        log.error("agent loop %s %s; restarting it in %.1f s", name, why, delay, exc_info=exc)
        await asyncio.sleep(delay)
