"""The agent's gRPC channel to the broker: reconnect backoff, message sizes, keepalive, TLS.

Keepalive (``docs/agent.md``, "Keepalive"): a rig's uplink may start dropping every
packet without a reset (a half-open connection). TCP alone would then wait for its
retransmission timeout, minutes; instead the agent pings after ``keepalive_time_s``
without a frame from the broker, and a ping that is not acknowledged within
``keepalive_timeout_s`` closes the connection, failing its calls with UNAVAILABLE, so
the instruction stream reconnects on a fresh connection as soon as the link is back.
Pings go out even on a connection without calls and without limit while no data flows
(``max_pings_without_data`` 0): the instruction stream is often silent for hours. The
broker permits pings every ``BROKER_MIN_PING_INTERVAL_S`` or less often; the config
refuses a shorter ``keepalive_time_s``.
"""

from __future__ import annotations

import grpc

from worker_agent.config import AgentConfig

__all__ = ["broker_channel", "channel_options"]


def channel_options(config: AgentConfig) -> list[tuple[str, int]]:
    """The channel arguments of the agent's connection to the broker."""
    return [
        # Reconnect quickly once the broker is back (gRPC's default backoff grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", int(config.reconnect_min_s * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(config.reconnect_min_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(config.reconnect_max_s * 1000)),
        ("grpc.max_receive_message_length", 16 << 20),
        ("grpc.max_send_message_length", 16 << 20),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def broker_channel(config: AgentConfig) -> grpc.aio.Channel:
    """The agent's channel to the broker: TLS verified with ``tls_ca`` (and a client
    certificate for mutual TLS) when set, else plaintext."""
    options = channel_options(config)
    if config.tls_ca is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=config.tls_ca.read_bytes(),
            private_key=config.tls_key.read_bytes() if config.tls_key else None,
            certificate_chain=config.tls_cert.read_bytes() if config.tls_cert else None,
        )
        return grpc.aio.secure_channel(config.broker_address, creds, options=options)
    return grpc.aio.insecure_channel(config.broker_address, options=options)
