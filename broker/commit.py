"""Group commit's bookkeeping for ``BrokerService.apply`` (``broker/service.py``): a queued
call, how its caller is answered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from broker.errors import DatabaseUnavailable
from broker.events import Command, Event, Heartbeat

__all__ = ["Pending", "answer_with", "failed_write", "in_memory_only", "settle"]


@dataclass(slots=True)
class Pending:
    """One queued call of :meth:`BrokerService.apply` (or a renewal) awaiting its flush."""

    events: tuple[Event, ...]
    handled: tuple[Command, ...]
    """Commands of events the core already handled (a renewal handled at once)."""
    done: Callable[[list[Command] | BaseException], None]
    in_memory: bool = False
    """Heartbeats only: handled, and answered from memory, during a database outage."""
    cmds: list[Command] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.in_memory = self.in_memory or in_memory_only(self.events)


def in_memory_only(events: Iterable[Event]) -> bool:
    """Heartbeats only (leases live in memory)."""
    events = tuple(events)
    return bool(events) and all(isinstance(ev, Heartbeat) for ev in events)


def settle(
    future: asyncio.Future[list[Command]],
) -> Callable[[list[Command] | BaseException], None]:
    """The ``done`` of an ``apply`` call: its future's result or exception (unless the
    caller is gone: its events were still applied and saved)."""

    def done(outcome: list[Command] | BaseException) -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    return done


def answer_with(
    answer: Callable[[BaseException | None], None],
) -> Callable[[list[Command] | BaseException], None]:
    """The ``done`` of a renewal: ``answer(None)`` or ``answer(err)``."""

    def done(outcome: list[Command] | BaseException) -> None:
        answer(outcome if isinstance(outcome, BaseException) else None)

    return done


def failed_write(err: Exception) -> Exception:
    """What a caller whose change was in a failed transaction gets: for a database
    outage, that its change is kept and written once the database is back."""
    if not isinstance(err, DatabaseUnavailable):
        return err
    return DatabaseUnavailable(
        f"{err.message}; this change is kept and written when the database is "
        "back: retry with the same request_id (or report sequence numbers)",
        reason=err.reason,
        retry_after_s=err.retry_after_s,
    )
