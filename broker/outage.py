"""The broker's shell during a database outage (``BrokerService``'s half that handles it;
see ``broker/service.py``'s docstring for what an outage means to callers)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.core import BrokerCore
from broker.errors import DatabaseUnavailable, StaleWriter
from broker.events import Command, Writes

if TYPE_CHECKING:
    from broker.store import Store

__all__ = ["DatabaseOutages", "Outage"]

log = logging.getLogger("rigshift.broker")


@dataclass
class Outage:
    """The database failed: since when, why, and what the core holds that the store does not."""

    since: float
    """time.monotonic() of the first failure."""
    cause: DatabaseUnavailable
    writes: Writes = field(default_factory=Writes)
    """What the store lacks: every batch's writes since the failure, in order."""
    commands: list[Command] = field(default_factory=list)
    """Commands of the held changes, carried out once those are committed."""


class DatabaseOutages:
    """Holding changes while the database refuses writes, and writing them once it is back
    (a base of ``BrokerService``, which sets these attributes)."""

    core: BrokerCore
    store: Store
    stale: bool
    on_stale: Callable[[], None] | None
    db_probe_interval_s: float
    db_retry_interval_s: float
    _outage: Outage | None
    _lock: asyncio.Lock
    _schedule_wanted: asyncio.Event

    def _committed(self, writes: Writes, cmds: list[Command]) -> None:
        raise NotImplementedError

    def _execute(self, cmds: list[Command]) -> None:
        raise NotImplementedError

    def database_down_for(self) -> float | None:
        """Seconds since the database failed, while it has not taken a write again; else None."""
        if self._outage is None:
            return None
        return time.monotonic() - self._outage.since

    def ensure_writable(self) -> None:
        """Raise DatabaseUnavailable during an outage (for calls that write the store
        directly before they apply an event: a row written there would not match the core)."""
        if self._outage is not None:
            raise self._refusal()

    def _begin_outage(self, cause: DatabaseUnavailable) -> None:
        if self._outage is None:
            log.warning(
                "database outage: %s; refusing changes until it takes writes again "
                "(heartbeats renew leases from memory)",
                cause.message,
            )
            self._outage = Outage(time.monotonic(), cause)
        else:
            self._outage.cause = cause

    def _hold(self, writes: Writes, cmds: list[Command]) -> None:
        assert self._outage is not None
        self._outage.writes |= writes
        self._outage.commands += cmds

    def _refusal(self) -> DatabaseUnavailable:
        assert self._outage is not None
        cause = self._outage.cause
        down = time.monotonic() - self._outage.since
        return DatabaseUnavailable(
            f"{cause.message}; the broker refuses changes until the database is back "
            f"(down {down:.0f} s): retry",
            reason=cause.reason,
            retry_after_s=cause.retry_after_s,
        )

    def _holds_changes_for(self, worker_id: str) -> bool:
        """True when a held (uncommitted) change concerns this worker or its attempts."""
        outage = self._outage
        if outage is None:
            return False
        if worker_id in outage.writes.worker_ids:
            return True
        jobs = (self.core.job(job_id) for job_id in outage.writes.job_ids)
        return any(a.worker_id == worker_id for job in jobs for a in job.attempts)

    async def _recover(self) -> None:
        """Write what the core holds; once committed, carry out the held commands."""
        async with self._lock:
            outage = self._outage
            if outage is None or self.stale:
                return
            try:
                if outage.writes:
                    self.store.save(self.core, outage.writes)
            except StaleWriter:
                self.stale = True
                if self.on_stale is not None:
                    self.on_stale()
                return
            except DatabaseUnavailable as err:
                outage.cause = err
                return
            except Exception as err:
                log.exception("writing the changes held during the database outage failed")
                outage.cause = DatabaseUnavailable(
                    f"the last write failed ({type(err).__name__}: {err})"
                )
                return
            self._outage = None
            log.info(
                "database back after %.1f s: wrote the %d job(s) and %d worker(s) held in "
                "memory; accepting changes again",
                time.monotonic() - outage.since,
                len(outage.writes.job_ids),
                len(outage.writes.worker_ids),
            )
            self._committed(outage.writes, outage.commands)
            self._schedule_wanted.set()
            self._execute(outage.commands)

    async def _database_loop(self) -> None:
        """Probe the database: now and then while it serves (so an idle broker notices an
        outage), every ``db_retry_interval_s`` during one, recovering once it takes writes."""
        probe_at = time.monotonic() + self.db_probe_interval_s
        while True:
            await asyncio.sleep(self.db_retry_interval_s)
            if self._outage is None and time.monotonic() < probe_at:
                continue
            probe_at = time.monotonic() + self.db_probe_interval_s
            try:
                await asyncio.to_thread(self.store.check_writable)
            except DatabaseUnavailable as err:
                self._begin_outage(err)
                continue
            except Exception:
                log.exception("database probe failed")
                continue
            if self._outage is not None:
                await self._recover()
