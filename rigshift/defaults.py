"""Defaults the broker, the agent and the client must agree on, each defined once.

The lease contract: an agent renews its lease every :data:`HEARTBEAT_INTERVAL_S`;
the broker takes a worker that has not renewed for :data:`LEASE_TTL_S` as offline
and requeues its jobs. At least :data:`HEARTBEATS_PER_TTL` heartbeats must fit in
one TTL, so that one lost packet or one slow broker tick does not expire a lease:
the broker refuses a configuration that breaks this, and the agent heartbeats at
most every TTL / :data:`HEARTBEATS_PER_TTL` whatever the broker says.

gRPC keepalive: the broker accepts a client ping without data at most every
:data:`BROKER_MIN_PING_INTERVAL_S` (closer pings are strikes, then GOAWAY
``too_many_pings``), so the agent never pings more often.
"""

from __future__ import annotations

__all__ = [
    "BROKER_ADDRESS",
    "BROKER_MIN_PING_INTERVAL_S",
    "HEARTBEATS_PER_TTL",
    "HEARTBEAT_INTERVAL_S",
    "LEASE_TTL_S",
    "max_heartbeat_interval_s",
]

BROKER_ADDRESS = "127.0.0.1:50051"
"""Where the broker listens, and where the CLI and tools look for it, by default."""

LEASE_TTL_S = 15.0
"""A worker that has not renewed its lease for this long is offline."""

HEARTBEAT_INTERVAL_S = 3.0
"""How often an agent renews its lease (the broker tells agents its own value)."""

HEARTBEATS_PER_TTL = 3
"""At least this many heartbeats must fit in one lease TTL."""

BROKER_MIN_PING_INTERVAL_S = 5.0
"""The broker's ``grpc.http2.min_ping_interval_without_data_ms``, in seconds."""


def max_heartbeat_interval_s(lease_ttl_s: float) -> float:
    """The longest heartbeat interval a lease TTL allows: TTL / :data:`HEARTBEATS_PER_TTL`."""
    return lease_ttl_s / HEARTBEATS_PER_TTL
