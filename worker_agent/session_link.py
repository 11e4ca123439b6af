"""One open ``WorkerService.Session`` call as the agent's heartbeat loop sees it (issue 17).

Renewals go out on the call in order and the broker answers them in order, each with one
``lease_renewed`` between the instructions; so each answer belongs to the oldest renewal
not yet answered (:meth:`SessionLink.answered`). When the call ends, every renewal still
waiting fails with :class:`SessionBroken` (``retry`` when the agent itself reset the
stream or the broker ended it cleanly: the heartbeat loop then sends again on the next
call within its deadline).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass

from rigshift.v1 import worker_service_pb2 as ws

__all__ = ["Renewal", "SessionBroken", "SessionLink"]


class SessionBroken(Exception):
    """The session ended before a renewal was answered."""

    def __init__(self, code: str, details: str, *, retry: bool = False) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
        self.retry = retry


@dataclass(slots=True)
class Renewal:
    """One renewal sent: when (monotonic), the status it carried, and its answer."""

    sent_at: float
    status: tuple[list[str], list[str]] | None
    answer: asyncio.Future[ws.LeaseRenewed]


class SessionLink:
    """The requests of one Session call and the renewals waiting for their answers."""

    def __init__(self) -> None:
        self._requests: asyncio.Queue[ws.SessionRequest | None] = asyncio.Queue()
        self._waiting: collections.deque[Renewal] = collections.deque()
        self.closed = False

    async def requests(self) -> AsyncIterator[ws.SessionRequest]:
        """The call's request stream (ends when the link closes)."""
        while (request := await self._requests.get()) is not None:
            yield request

    def renew(
        self,
        request: ws.SessionRequest,
        sent_at: float,
        status: tuple[list[str], list[str]] | None,
    ) -> Renewal:
        """Send one renewal; its ``answer`` resolves with the broker's LeaseRenewed."""
        renewal = Renewal(sent_at, status, asyncio.get_running_loop().create_future())
        if self.closed:
            renewal.answer.set_exception(SessionBroken("CANCELLED", "closed", retry=True))
            return renewal
        self._waiting.append(renewal)
        self._requests.put_nowait(request)
        return renewal

    def answered(self, renewed: ws.LeaseRenewed) -> Renewal | None:
        """The renewal this answer belongs to (the oldest unanswered), now resolved."""
        if not self._waiting:
            return None
        renewal = self._waiting.popleft()
        if not renewal.answer.done():
            renewal.answer.set_result(renewed)
        return renewal

    def close(self, broken: SessionBroken) -> None:
        """The call ended: fail every renewal still waiting, send nothing more."""
        self.closed = True
        self._requests.put_nowait(None)
        while self._waiting:
            renewal = self._waiting.popleft()
            if not renewal.answer.done():
                renewal.answer.set_exception(broken)
                renewal.answer.exception()  # retrieved: nobody may be waiting any more
