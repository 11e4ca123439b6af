"""The agent's view of its lease: when it must stop its attempts so a job never runs twice.

Pure bookkeeping on the monotonic clock (times are passed in, from ``time.monotonic``):
a step of the wall clock (NTP, a wrong RTC after a reboot) neither expires nor extends
the lease.

The broker expires a worker's lease ``ttl_s`` after it *received* the worker's last
heartbeat and then requeues the worker's attempts elsewhere. The agent knows when it
*sent* the last heartbeat that was answered (``renewed_at``), which is earlier, so the
broker cannot requeue before ``renewed_at + ttl_s``. An agent that cannot reach the
broker therefore stops its attempts early enough for them to be gone by then::

    renewed_at                 stop_at                        renewed_at + ttl_s
        |---- heartbeats fail ----|--- attempts being stopped ---|  the broker may requeue

``stop_lead_s`` is how long stopping may take (SIGTERM, the agent's ``cancel_grace_s``,
SIGKILL) plus a margin; it is capped at half the TTL, so a lease too short for it is
fenced as well as it can be (the agent warns at registration).

One case differs: a broker whose port *refuses* connections is not running, so nobody
can expire the lease, and a broker that starts gives every live worker a fresh lease.
While the last failure was a refusal the attempts are kept until ``renewed_at + ttl_s +
grace_s`` (``lease_grace_s``), so a broker restart does not cost the fleet its jobs.

The same instant, moved onto the system-wide ``CLOCK_BOOTTIME`` (:meth:`Lease.fence_at`),
is what the agent writes for its jobs' lease fences (``fence.py``): processes of their
own that kill the jobs at that time even when the agent process cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["STOP_MARGIN_S", "Lease", "is_refusal"]

#: Added to the kill grace: the time a stop takes beyond SIGTERM -> SIGKILL (process tree
#: walk, the executor's round trip).
STOP_MARGIN_S = 0.5


def is_refusal(details: str | None) -> bool:
    """Whether a failed call's details say the broker's port refused the connection."""
    return "connection refused" in (details or "").lower()


@dataclass(slots=True)
class Lease:
    """One worker's lease as its agent sees it (see the module docstring)."""

    ttl_s: float
    """The broker's lease TTL."""
    grace_s: float
    """How long past the TTL attempts are kept while the broker refuses connections."""
    stop_lead_s: float
    """How long before the TTL the attempts must start stopping when the broker is silent."""
    renewed_at: float
    """Monotonic time the last answered heartbeat (or registration) was sent."""
    broker_down: bool = False
    """The last failure was a refused connection (no broker process is listening)."""
    failing_since: float | None = None
    """Monotonic time of the first failure since the last renewal; None while renewed."""

    def renewed(self, sent_at: float) -> float | None:
        """The broker answered a heartbeat sent at ``sent_at``. Returns how long no
        heartbeat had been answered when that was an outage (heartbeats failed, or the
        agent itself was frozen past the TTL); None otherwise."""
        gap = sent_at - self.renewed_at
        outage = gap if self.failing_since is not None or gap > self.ttl_s else None
        self.renewed_at = max(self.renewed_at, sent_at)
        self.broker_down = False
        self.failing_since = None
        return outage

    def failed(self, now: float, *, refused: bool) -> bool:
        """A heartbeat failed; True when it is the first failure since the last renewal."""
        first = self.failing_since is None
        if first:
            self.failing_since = now
        self.broker_down = refused
        return first

    @property
    def expires_at(self) -> float:
        """The earliest time the broker may expire the lease (monotonic)."""
        return self.renewed_at + self.ttl_s

    @property
    def lead_s(self) -> float:
        """The stop lead in effect (capped at half the TTL)."""
        return min(self.stop_lead_s, self.ttl_s / 2)

    @property
    def stop_at(self) -> float:
        """When running attempts must be stopped if no heartbeat is answered by then."""
        if self.broker_down:
            return self.expires_at + self.grace_s
        return self.expires_at - self.lead_s

    def fence_at(self, now: float, clock_now: float) -> float:
        """:attr:`stop_at` on another clock that reads ``clock_now`` at monotonic ``now``."""
        return clock_now + (self.stop_at - now)

    def must_stop(self, now: float) -> bool:
        """Whether the attempts must be stopped (or not started) now."""
        return now >= self.stop_at
